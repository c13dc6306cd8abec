"""User-facing error types.

Every error a user can cause (bad prompt, unknown model, missing store, ...) is raised as a subclass of
:class:`CircuitscopeError` whose message is one plain sentence saying what happened and what to do. The CLI
prints it without a traceback and the pages show it with ``st.error``.
"""

from __future__ import annotations


class CircuitscopeError(Exception):
    """Base class: the message is meant for the user, verbatim."""


class ModelUnavailableError(CircuitscopeError):
    """The model name is unknown, or its weights are neither cached locally nor reachable."""


class StoreError(CircuitscopeError):
    """A store is missing, corrupt, locked, or written by a newer schema."""


class InputError(CircuitscopeError):
    """User input (a prompt, a file, a parameter) cannot be used as given."""
