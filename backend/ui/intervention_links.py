"""Links into the Prompt Explorer's interventions: one place for their URL parameters, so the Circuit Graph ("intervene
on these nodes") and a feature's dashboard ("steer with this feature") open the same view the Prompt Explorer writes
into its own address bar.

``prompt_explorer?store=...&model=...&prompt=TEXT&do=SPEC&on=frozen,live&answer=TOKEN&wrong=TOKEN&n=8``: ``do`` is the
interventions' text form (:mod:`backend.interventions.spec`, e.g. ``transcoder:3:12@5=zero;attn:8:7=scale:2``), ``on``
the models to run it on, side by side in that order (``live``, ``frozen`` or both), ``answer`` / ``wrong`` the
metric's target tokens, ``n`` the greedy continuation's length.
"""

from __future__ import annotations

import math
from typing import Sequence
from urllib.parse import urlencode

import streamlit as st

from backend.dictionaries.kinds import ATTN_SAE, TRANSCODER

PAGE = "pages/prompt_explorer.py"
PAGE_URL = "prompt_explorer"  # the page's URL path (relative: works under any base path)
PROMPT_PARAM = "prompt"
DO_PARAM = "do"
ON_PARAM = "on"
ANSWER_PARAM = "answer"
WRONG_PARAM = "wrong"
STEPS_PARAM = "n"
# The intervention kind of each dictionary kind (the text form's KIND).
SPEC_KIND = {TRANSCODER: "transcoder", ATTN_SAE: "attn"}
# Steering default when a feature's corpus maximum is unknown: a multiple of its own activation (see steer_spec).
FALLBACK_SCALE = 4.0


def intervention_params(store: str, model: str | None, do: str, on: Sequence[str] = ("live",),
                        prompt: str | None = None, answer: str | None = None, wrong: str | None = None,
                        steps: int | None = None) -> dict[str, str]:
    """The Prompt Explorer's query parameters for these interventions (absent values are left out, so the page keeps
    the prompt and target typed before)."""
    params = {"store": store, "model": model or "", DO_PARAM: do, ON_PARAM: ",".join(on)}
    for name, value in ((PROMPT_PARAM, prompt), (ANSWER_PARAM, answer), (WRONG_PARAM, wrong),
                        (STEPS_PARAM, None if steps is None else str(int(steps)))):
        if value:
            params[name] = value
    return params


def steer_spec(dict_kind: str, layer: int, feature: int, max_act: float | None) -> str:
    """The default "steer with this feature" intervention: hold the feature at its strongest activation in the store's
    corpus (``set:MAX``) at every position after BOS.

    Why ``set`` to the corpus maximum: a prompt one steers is usually one where the feature is silent, and ``scale``
    multiplies the feature's own activation, so it would change nothing there; ``set`` adds the feature's decoder
    direction wherever it is below the value, and its corpus maximum is a strength the model has already seen the
    feature take (stronger clamps push the residual stream out of distribution). Without a recorded maximum it falls
    back to ``scale:4`` (amplify the feature where it fires)."""
    kind = SPEC_KIND[dict_kind]
    if max_act is not None and math.isfinite(float(max_act)) and float(max_act) > 0:
        return f"{kind}:{int(layer)}:{int(feature)}=set:{float(max_act):.4g}"
    return f"{kind}:{int(layer)}:{int(feature)}=scale:{FALLBACK_SCALE:g}"


def page_link(label: str, params: dict[str, str], icon: str = ":material/tune:") -> None:
    """A link to the Prompt Explorer with ``params``: a page link inside the app's navigation (keeps the session),
    a plain relative link when a page runs on its own."""
    from streamlit.errors import StreamlitAPIException

    try:
        st.page_link(PAGE, label=label, icon=icon, query_params=params)
    except StreamlitAPIException:
        st.markdown(f"[{label}]({PAGE_URL}?{urlencode(params)})")


def steer_link(store: str, model: str | None, dict_kind: str, layer: int, feature: int,
               max_act: float | None) -> None:
    """The "Steer with this feature" link of a feature's dashboard: the Prompt Explorer with :func:`steer_spec`
    preselected on the live model (its continuation shows the steering)."""
    if dict_kind not in SPEC_KIND:
        return
    params = intervention_params(store, model, steer_spec(dict_kind, layer, feature, max_act))
    page_link(f"Steer with feature #{int(feature)} in the Prompt Explorer", params)
