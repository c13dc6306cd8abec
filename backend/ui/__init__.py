"""Streamlit-only helpers for ``app.py`` and ``pages/``: page shell and URL state, caches, token HTML, progress.

Nothing outside this package imports Streamlit (``tests/test_architecture.py`` checks it).
"""
