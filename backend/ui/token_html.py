"""Untrusted token text -> HTML: every token and tooltip is escaped with ``html.escape``."""

from __future__ import annotations

import html
import math
from typing import Sequence


def visible_token(text: str) -> str:
    """Token text with newlines and tabs made visible (for tables and the token strip)."""
    return text.replace("\r", "\\r").replace("\n", "↵").replace("\t", "⇥")


def token_strip_html(strings: Sequence[str], values: Sequence[float] | None = None, vmax: float | None = None,
                     label: str = "value") -> str:
    """HTML of tokens side by side, each shaded by its value (e.g. next-token loss); NaN values stay unshaded.

    Token text is untrusted (it comes from user prompts and corpora): every token and tooltip is escaped with
    html.escape, so ``<script>`` shows as text and never runs.
    """
    vals = list(values) if values is not None else [math.nan] * len(strings)
    finite = [v for v in vals if v is not None and math.isfinite(v)]
    top = vmax if vmax is not None else (max(finite) if finite else 1.0)
    top = top if top > 0 else 1.0
    spans = []
    for i, (s, v) in enumerate(zip(strings, vals)):
        ok = v is not None and math.isfinite(v)
        alpha = min(1.0, max(0.0, v / top)) if ok else 0.0
        tip = f"pos {i}" + (f" · {label} {v:.3f}" if ok else "")
        spans.append(
            f'<span title="{html.escape(tip, quote=True)}" style="background: rgba(230, 85, 13, {alpha:.2f}); '
            f'border: 1px solid rgba(128,128,128,.35); border-radius: 3px; padding: 1px 2px; margin: 1px; '
            f'white-space: pre; display: inline-block; font-family: monospace;">{html.escape(visible_token(s), quote=True)}</span>'
        )
    return '<div style="line-height: 1.9; word-wrap: break-word;">' + "".join(spans) + "</div>"


def signed_token_strip_html(strings: Sequence[str], values: Sequence[float], label: str = "value",
                            vmax: float | None = None) -> str:
    """Like :func:`token_strip_html` for signed values: positive shades red, negative blue (NaN unshaded).

    Token text and tooltips are escaped with html.escape (token text is untrusted).
    """
    vals = [float(v) if v is not None else math.nan for v in values]
    finite = [abs(v) for v in vals if math.isfinite(v)]
    top = vmax if vmax is not None else (max(finite) if finite else 1.0)
    top = top if top > 0 else 1.0
    spans = []
    for i, (s, v) in enumerate(zip(strings, vals)):
        ok = math.isfinite(v)
        alpha = min(1.0, abs(v) / top) if ok else 0.0
        rgb = "214, 39, 40" if ok and v >= 0 else "31, 119, 180"
        tip = f"pos {i}" + (f" · {label} {v:+.3f}" if ok else "")
        spans.append(
            f'<span title="{html.escape(tip, quote=True)}" style="background: rgba({rgb}, {alpha:.2f}); '
            f'border: 1px solid rgba(128,128,128,.35); border-radius: 3px; padding: 1px 2px; margin: 1px; '
            f'white-space: pre; display: inline-block; font-family: monospace;">'
            f'{html.escape(visible_token(s), quote=True)}</span>'
        )
    return '<div style="line-height: 1.9; word-wrap: break-word;">' + "".join(spans) + "</div>"
