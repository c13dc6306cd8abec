"""Recording a model in a store: its spec and shape (``models``) and its vocabulary (``vocab``).

Pages decode token ids from ``vocab`` without loading a tokenizer, so every write that stores token ids for a model
(a precompute run, a saved comparison or graph) records the model first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from backend.model.registry import ModelSpec
    from backend.store.access import StoreWriter
    from backend.store.saves import SaveWriter


def record_model(writer: "StoreWriter | SaveWriter", model: Any, spec: "ModelSpec", n_ctx: int | None = None) -> None:
    """Write ``spec``'s ``models`` row (``n_ctx``: the corpus context length of this run, None keeps the stored one)
    and its vocabulary if the store does not hold all of it yet."""
    import pandas as pd

    from backend.inputs.prompts import token_strings

    con, cfg = writer.con, model.cfg
    assert con is not None
    if n_ctx is not None or not con.execute("SELECT count(*) FROM models WHERE model = ?", [spec.name]).fetchall()[0][0]:
        con.execute("DELETE FROM models WHERE model = ?", [spec.name])
        con.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [spec.name, spec.family, spec.description, cfg.n_layers, cfg.d_model, cfg.n_heads,
             cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab, n_ctx, spec.to_json(), writer.run_id],
        )
    has_vocab = con.execute("SELECT count(*) FROM vocab WHERE model = ?", [spec.name]).fetchall()[0][0]
    if has_vocab != cfg.d_vocab:
        con.execute("DELETE FROM vocab WHERE model = ?", [spec.name])
        ids = list(range(cfg.d_vocab))
        writer.insert_df("vocab", pd.DataFrame({"model": spec.name, "token_id": ids,
                                                "token_str": token_strings(model.tokenizer, ids)}))
