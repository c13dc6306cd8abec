"""Interventions: set, scale or zero dictionary features or attention heads on a prompt and see what the model does.

* :mod:`.spec` — what an intervention is (:class:`~.spec.Intervention`) and its one-line text form for links and the
  CLI (``transcoder:12:1034@3,4=scale:2``).
* :mod:`.run` — the TransformerLens hooks that apply interventions to the live model or to the frozen-attention
  replacement model of an attribution graph, and the comparison of intervened and unchanged runs (next-token
  distribution, greedy continuation, the metric's change).
"""
