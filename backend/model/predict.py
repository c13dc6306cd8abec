"""Next-token predictions for a prompt: the Prompt Explorer's per-token loss and top predictions."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd

# Longest prompt (in tokens, BOS included) the Prompt Explorer runs. Measured on 2 loaded cores with SmolLM2-135M:
# 256 tokens ~1.1 s, 512 ~2.2 s, 2048 (its full context) ~67 s — far too slow for an interactive page.


# Longest prompt (in tokens, BOS included) the Prompt Explorer runs. Measured on 2 loaded cores with SmolLM2-135M:
# 256 tokens ~1.1 s, 512 ~2.2 s, 2048 (its full context) ~67 s — far too slow for an interactive page.
EXPLORER_MAX_TOKENS = 512


def next_token_predictions(model: Any, ids: Sequence[int], k: int = 5) -> pd.DataFrame:
    """One forward pass: per position, the token, the loss of the actual next token and the top-k predictions.

    Columns: pos, token, token_id, next_token, loss (NaN at the last position: nothing follows it), top_tokens,
    top_probs (lists of length k, best first).
    """
    import torch

    tokenizer = model.tokenizer
    with torch.inference_mode():
        logits = model(torch.tensor([list(ids)], dtype=torch.long), return_type="logits")[0].float()
    logprobs = logits.log_softmax(dim=-1)
    n = len(ids)
    loss = [math.nan] * n
    if n > 1:
        nxt = torch.tensor(list(ids[1:]), dtype=torch.long)
        loss[:-1] = (-logprobs[:-1].gather(-1, nxt[:, None])[:, 0]).tolist()
    top = logprobs.topk(k, dim=-1)
    top_ids = top.indices.tolist()
    top_probs = top.values.exp().tolist()
    decoded: dict[int, str] = {}

    def dec(i: int) -> str:
        if i not in decoded:
            decoded[i] = tokenizer.decode([i])
        return decoded[i]

    return pd.DataFrame({
        "pos": list(range(n)),
        "token": [dec(i) for i in ids],
        "token_id": list(ids),
        "next_token": [dec(i) for i in ids[1:]] + [""],
        "loss": loss,
        "top_tokens": [[dec(i) for i in row] for row in top_ids],
        "top_probs": top_probs,
    })
