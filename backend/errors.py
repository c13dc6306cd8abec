"""User-facing error types.

Every error a user can cause (bad prompt, unknown model, missing store, ...) is raised as a subclass of
:class:`CircuitscopeError` whose message is one plain sentence saying what happened and what to do. The CLI
prints it without a traceback and the pages show it with ``st.error``.
"""

from __future__ import annotations

import re


class CircuitscopeError(Exception):
    """Base class: the message is meant for the user, verbatim."""


class ModelUnavailableError(CircuitscopeError):
    """The model name is unknown, or its weights are neither cached locally nor reachable."""


class StoreError(CircuitscopeError):
    """A store is missing, corrupt, locked, or written by a newer schema."""


class InputError(CircuitscopeError):
    """User input (a prompt, a file, a parameter) cannot be used as given."""


# Control characters (including newlines and the Unicode line/paragraph separators) would break a one-line message.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_BACKTICKS = re.compile(r"`+")
LITERAL_MAX_CHARS = 120


def literal(value: object, limit: int = LITERAL_MAX_CHARS) -> str:
    """An untrusted value (a URL parameter, typed text, a file name, a store's contents) as a markdown code span.

    Messages are shown as markdown by the pages (``st.error`` and friends): inside a code span nothing is markup, so
    ``![x](http://evil.example/p.png)``, links, autolinks and HTML show as the characters they are instead of making
    the browser fetch an image or drawing a live link. The fence is one backtick longer than the longest run of
    backticks inside (CommonMark's rule for a code span that contains backticks); newlines and other control characters
    become one space so the message stays one line, and the value is cut to ``limit`` characters. In a terminal the
    backticks read as quotes.
    """
    text = _CONTROL.sub(" ", str(value))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(text)), default=0) + 1)
    # CommonMark strips one space on each side when both are there, and a backtick at either end would merge with the
    # fence: pad with a space each side in those cases (and show an empty value as a visible empty span).
    if not text.strip():
        return f"{fence} {text} {fence}" if text else "`''`"
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"
