"""circuitscope from Python (notebooks, scripts): the same functions the pages and the CLI run, behind one object.

    from backend.api import open_workspace

    ws = open_workspace("data/stores/demo.duckdb")
    ws.dictionaries()                                  # the store's attention SAEs and transcoders
    dash = ws.feature(ws.dictionaries().dict_id[0], 7)  # one feature's dashboard data (DataFrames)
    graph = ws.graph("The capital of France is")        # attribution graph of the top prediction
    circuit = ws.prune(graph, node_threshold=0.8)       # pruned copy; ws.scores(circuit) for its graph scores
    ws.faithfulness(circuit, mode="zero")               # metric kept, error nodes frozen and live
    ws.export(circuit, "paris.json")                    # .json (Neuronpedia) .graphml .dot .svg .png
    ws.intervene("The capital of France is", "transcoder:0:5=zero", answer=" Paris")
    ws.compare(task="ioi", examples=2)                  # patching vs AtP / AtP* / RelP / IG
    ws.search_labels("France")                          # features of every dictionary by label text
    ws.set_label(dict_id, 7, "capital cities")          # your label, preferred over the automatic one
    ws.export_bundle(circuit, "paris-bundle.zip")       # graph JSON + one circuit-tracer feature JSON per feature
    ws.export_sae(dict_id, "exported-sae/")             # sae-lens directory (SAE.load_from_disk reads it)
    ws.feature_on_text(dict_id, 7, "Paris is lovely")   # one feature's activation on each token of your text
    ws.compare_graphs("The capital of France is", "The capital of Spain is")  # shared / unique nodes

The store is opened read-only for every call; only :meth:`Workspace.save_graph`, :meth:`Workspace.set_label` and
:meth:`Workspace.compare` with ``save=True`` write (beside the store, never copying it), and
:meth:`Workspace.add_automatic_labels` (a run of kind ``label``, which copies the store as every run does). The model and the dictionaries load on first use, on the
device :mod:`backend.model.device` chooses (``device=`` overrides it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from backend.model.registry import DEFAULT_MODEL

if TYPE_CHECKING:
    import pandas as pd

    from backend.attribution.compare import Comparison
    from backend.circuits.compare import GraphComparison
    from backend.circuits.graph import Graph
    from backend.interventions.run import InterventionResult


@dataclass
class FeatureData:
    """What a feature's dashboard shows, as the store holds it."""

    summary: dict[str, Any] | None
    label: dict[str, Any]
    flags: dict[str, Any]
    top_examples: "pd.DataFrame"
    quantile_examples: "pd.DataFrame"
    histogram: "pd.DataFrame"
    logits: "pd.DataFrame"
    head_dfa: "pd.DataFrame"


@dataclass
class Workspace:
    """One store and one model; build it with :func:`open_workspace`."""

    store: Path
    model_name: str
    device: str | None = None
    _model: Any = field(default=None, repr=False)
    _dictionaries: tuple[dict[int, Any], dict[int, Any]] | None = field(default=None, repr=False)

    # -- reading the store -----------------------------------------------------------------------------------
    def query(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(con, *args, **kwargs)`` on a read-only connection to the store (any backend query function)."""
        from backend.store.access import reading

        with reading(self.store) as con:
            return fn(con, *args, **kwargs)

    def dictionaries(self) -> "pd.DataFrame":
        """The store's dictionaries (attention SAEs and transcoders) with their quality figures."""
        from backend.features.queries import feature_dictionaries

        return self.query(feature_dictionaries)

    def feature(self, dict_id: str, feature: int) -> FeatureData:
        """One feature's dashboard data: summary, top and per-interval examples, histogram, logit effects, DFA by
        head (attention SAEs)."""
        from backend.features import queries as q
        from backend.features.labels import feature_label
        from backend.store.access import reading

        f = int(feature)
        with reading(self.store) as con:  # one connection (and one attach of the saves) for every query
            return FeatureData(
                summary=q.feature_summary(con, dict_id, f), label=feature_label(con, dict_id, f),
                flags=q.feature_flags(con, dict_id, f), top_examples=q.feature_top_examples(con, dict_id, f),
                quantile_examples=q.feature_quantile_examples(con, dict_id, f),
                histogram=q.feature_histogram(con, dict_id, f), logits=q.feature_logits(con, dict_id, f),
                head_dfa=q.feature_head_dfa(con, dict_id, f))

    def search_labels(self, text: str, kind: str | None = None, limit: int = 500) -> "pd.DataFrame":
        """Features of every dictionary whose label (yours, else the automatic one) contains ``text``."""
        from backend.features.labels import search_labels

        return self.query(search_labels, text, kind, limit)

    def set_label(self, dict_id: str, feature: int, text: str) -> str:
        """Save your label of a feature beside the store ('' removes it); returns the label stored."""
        from backend.features.labels import save_user_label

        return save_user_label(self.store, dict_id, feature, text)

    def add_automatic_labels(self) -> int:
        """Compute every feature's automatic label and write them into the store (a run of kind ``label``)."""
        from backend.features.labels import label_store

        return label_store(self.store)

    def export_bundle(self, graph: "Graph", path: str | Path) -> Path:
        """Write ``graph`` with one circuit-tracer feature JSON per feature node: a directory or a ``.zip``."""
        from backend.features.bundle import write_bundle

        return self.query(write_bundle, graph, path)

    def export_sae(self, dict_id: str, directory: str | Path) -> Path:
        """Write a stored dictionary as a sae-lens directory (``sae_lens.SAE.load_from_disk`` reads it back)."""
        from backend.dictionaries.storage import export_sae_lens

        return self.query(export_sae_lens, dict_id, directory)

    def feature_on_text(self, dict_id: str, feature: int, text: str) -> "pd.DataFrame":
        """One feature's activation at each token of ``text`` (BOS first, NaN: not scored): token, act."""
        import pandas as pd

        from backend.dictionaries.storage import load_dictionary
        from backend.features.live import feature_on_tokens
        from backend.features.queries import feature_summary
        from backend.inputs.prompts import encode_prompt
        from backend.store.access import reading

        with reading(self.store) as con:
            s = feature_summary(con, dict_id, int(feature))
            if s is None:
                from backend.errors import InputError

                raise InputError(f"This store has no feature {int(feature)} in dictionary {dict_id!r}.")
            sae = load_dictionary(con, dict_id)
        enc = encode_prompt(self.model, text)
        acts = feature_on_tokens(self.model, sae, str(s["kind"]), int(s["layer"]), int(feature), enc.ids)
        return pd.DataFrame({"token": enc.strings, "act": acts})

    # -- the model and its dictionaries ----------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The HookedTransformer (loaded on first use)."""
        if self._model is None:
            from backend.model.registry import load_model

            self._model = load_model(self.model_name, device=self.device)
        return self._model

    def replacement(self) -> tuple[dict[int, Any], dict[int, Any]]:
        """``({layer: transcoder}, {layer: attention SAE})`` from the store (loaded on first use)."""
        if self._dictionaries is None:
            from backend.dictionaries.storage import graph_dictionaries

            self._dictionaries = self.query(graph_dictionaries, self.model_name)
        return self._dictionaries

    # -- graphs ------------------------------------------------------------------------------------------------
    def graph(self, prompt: str, answer: str | None = None, wrong: str | None = None,
              max_nodes: int = 400) -> "Graph":
        """The attribution graph of ``prompt`` for ``answer`` (default: the top prediction, demeaned) or the logit
        difference ``answer − wrong``, as built (unpruned), with its scores and conservation in its metadata."""
        from backend.circuits.build import BuildParams, build_graph

        from backend.features.labels import label_nodes

        transcoders, saes = self.replacement()
        graph = build_graph(self.model, prompt, transcoders, saes, answer=answer, wrong=wrong,
                            params=BuildParams(max_nodes=max_nodes), model_name=self.model_name)
        graph.nodes = self.query(label_nodes, graph.nodes)  # the features' labels (yours, else automatic)
        return graph

    def stored_graph(self, graph_id: str) -> "Graph":
        """A graph saved in the store."""
        from backend.circuits.storage import read_graph

        return self.query(read_graph, graph_id)

    @staticmethod
    def prune(graph: "Graph", node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "Graph":
        """A pruned copy: the nodes and edges that carry these shares of the influence on the target."""
        from backend.circuits.prune import prune

        return prune(graph, node_threshold, edge_threshold)

    @staticmethod
    def scores(graph: "Graph") -> dict[str, float]:
        """circuit-tracer's replacement and completeness scores and the error nodes' share of influence."""
        from backend.circuits.prune import graph_scores

        return graph_scores(graph)

    def faithfulness(self, circuit: "Graph", mode: str = "zero") -> dict[str, Any]:
        """How much of the metric ``circuit`` keeps when everything else is ablated (``zero`` or ``mean``), with
        error nodes frozen and live: ``{"frozen": result, "live": result}``."""
        from backend.circuits.faithfulness import check_in_store

        transcoders, saes = self.replacement()
        return check_in_store(self.model, circuit, transcoders, saes, mode, self.store, self.model_name)

    @staticmethod
    def export(graph: "Graph", path: str | Path) -> Path:
        """Write ``graph`` as .json (Neuronpedia / circuit-tracer), .graphml, .dot, .svg or .png."""
        from backend.circuits.export import export_to_file

        return export_to_file(graph, Path(path))

    def save_graph(self, graph: "Graph", title: str | None = None) -> str:
        """Save ``graph`` beside the store (visible to every reader at once); returns its id."""
        from backend.circuits.storage import save_graph

        return save_graph(self.store, graph, source="api", title=title)

    def compare_graphs(self, a: "str | Graph", b: "str | Graph", answer_a: str | None = None,
                       answer_b: str | None = None, node_threshold: float = 0.8,
                       edge_threshold: float = 0.98) -> "GraphComparison":
        """Two graphs side by side (:mod:`backend.circuits.compare`): ``a`` and ``b`` are prompts (their graphs are
        built for ``answer_a`` / ``answer_b``, default the top prediction) or graphs; each is pruned with the
        thresholds, then their nodes are matched by position-independent keys."""
        from backend.circuits.compare import compare_graphs

        graphs = [g if not isinstance(g, str) else self.graph(g, answer=ans) for g, ans in ((a, answer_a), (b, answer_b))]
        return compare_graphs(*(self.prune(g, node_threshold, edge_threshold) for g in graphs))

    def import_graph(self, path: str | Path) -> str:
        """Import a Neuronpedia / circuit-tracer graph JSON (with its pins, supernodes and labels) beside the store;
        returns the stored graph's id (``stored_graph`` and ``stored_view`` read it back)."""
        from backend.circuits.export.neuronpedia_read import import_graph

        return import_graph(self.store, Path(path).read_bytes())[0]

    def stored_view(self, graph_id: str) -> dict[str, Any] | None:
        """The saved view (thresholds, pins, hides, supernodes, labels) of a stored graph, or None."""
        from backend.circuits.storage import read_view

        return self.query(read_view, graph_id)

    # -- interventions and attribution -------------------------------------------------------------------------
    def intervene(self, prompt: str, interventions: str, on: str = "live", answer: str | None = None,
                  wrong: str | None = None, top_k: int = 10, continue_tokens: int = 0) -> "InterventionResult":
        """Set, scale or zero features or heads (the CLI's spec, e.g. ``"transcoder:5:123@3=zero; attn:8:44=scale:2; head:2:1=zero"``)
        on the live model or the frozen replacement model, beside the unchanged run."""
        from backend.interventions.run import intervene_on_prompt

        transcoders, saes = self.replacement()
        return intervene_on_prompt(self.model, prompt, interventions, transcoders, saes, mode=on, answer=answer,
                                   wrong=wrong, top_k=top_k, continue_tokens=continue_tokens)

    def compare(self, task: str | None = "ioi", examples: int = 4, seed: int = 0,
                pair: tuple[str, str, str, str] | None = None, methods: Sequence[str] | None = None,
                kinds: Sequence[str] = ("resid", "mlp", "head"), ig_steps: int = 8,
                save: bool = False) -> "Comparison":
        """Attribution methods against activation patching on a built-in ``task`` or one ``pair`` (clean, corrupt,
        answer, wrong); ``save`` stores the comparison beside the store."""
        from backend.attribution.compare import run_comparison, save_comparison
        from backend.inputs.tasks import build_task, custom_pair
        from backend.model.registry import get_spec

        batch = custom_pair(self.model, *pair) if pair is not None else build_task(task, self.model, n=examples,
                                                                                    seed=seed)
        comparison = run_comparison(self.model, batch, self.model_name, methods, kinds, ig_steps=ig_steps,
                                    source="api")
        if save:
            save_comparison(self.store, comparison, self.model, get_spec(self.model_name))
        return comparison


def open_workspace(store: str | Path, model: str = DEFAULT_MODEL, device: str | None = None) -> Workspace:
    """A :class:`Workspace` on the store at ``store`` for ``model``; a missing, corrupt or hostile store is refused
    now, in one sentence."""
    from backend.model.registry import get_spec
    from backend.store.access import open_store

    open_store(Path(store)).close()
    return Workspace(store=Path(store), model_name=get_spec(model).name, device=device)
