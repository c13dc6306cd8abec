"""The precompute step ``graphs``: attribution graphs for the preset's example prompts, stored so the Circuit Graph
page has something to show the moment a store is opened (users build their own there or with the CLI)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backend.pipeline.context import RunContext


def step_graphs(ctx: "RunContext") -> None:
    """Build and store one graph per ``preset.graphs.prompts`` entry ``(prompt, answer, wrong)`` with the store's
    transcoders and attention SAEs; a prompt whose answer is not one token for this model is skipped with a note."""
    from backend.circuits.build import BuildParams, build_graph
    from backend.circuits.storage import delete_graph, write_graph
    from backend.dictionaries.storage import graph_dictionaries
    from backend.errors import InputError
    from backend.features.labels import label_nodes
    from backend.progress import say, track

    # An earlier run's example graphs were built with the dictionaries this run replaced: they go, as the
    # attributions step replaces its comparisons (graphs users saved have another source and stay).
    for (old,) in ctx.con.execute("SELECT graph_id FROM graphs WHERE model = ? AND source = 'precompute' AND "
                                  "run_id IS DISTINCT FROM ?", [ctx.spec.name, ctx.run_id]).fetchall():
        delete_graph(ctx.con, old)
    transcoders, saes = graph_dictionaries(ctx.con, ctx.spec.name)
    done = []
    prompts = list(ctx.preset.graphs.prompts)
    for prompt, answer, wrong in track(prompts, total=len(prompts), desc="Attribution graphs", unit="graph"):
        try:
            graph = build_graph(ctx.model, prompt, transcoders, saes, answer=answer, wrong=wrong,
                                params=BuildParams(max_nodes=ctx.preset.graphs.max_nodes), model_name=ctx.spec.name)
        except InputError as exc:  # e.g. an answer that is several tokens for this tokenizer
            say(f"Skipped the graph of {prompt!r}: {exc}")
            continue
        graph.nodes = label_nodes(ctx.con, graph.nodes)  # the labels step ran earlier in this run
        gid = write_graph(ctx.con, graph, ctx.run_id, source="precompute")
        done.append({"graph_id": gid, "nodes": len(graph.nodes), "edges": len(graph.edges),
                     "seconds": graph.metadata["seconds"]})
    ctx.summary["graphs"] = done
