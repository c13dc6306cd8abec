"""The store's schema: every table circuitscope writes, in one versioned place.

A store is one DuckDB file. ``meta.schema_version`` says which version of this module wrote it; a reader
refuses a newer version with a clear message, and :data:`MIGRATIONS` upgrades older ones when a precompute
opens them for writing. Every data row carries the ``run_id`` of the precompute run that wrote it.

Tables (sparse by design: only nonzero feature activations are stored; attributions keep every component):

=====================  ===========================================================================
meta                   key/value facts about the file (schema_version, created_at, writer)
runs                   one row per precompute run: kind, model, preset, params, status, timings
models                 the model each run used: registry spec + shape
vocab                  token id -> token text for each model (pages decode without a tokenizer)
corpora                a tokenized corpus: source, licence, context length, sizes
contexts               one row per fixed-length context: the document it starts in
tokens                 (corpus, context, pos) -> token id and the model's next-token loss there
task_baselines         built-in task metrics on clean and corrupted prompts
dictionaries           SAEs / transcoders: hook, layer, architecture, widths, quality metrics (v4: the dense
                       linear baseline of a transcoder: its FVE and CE with that MLP replaced by it)
dictionary_weights     the dictionary's weights as a safetensors blob (one file = one store)
features               per-feature summary statistics (density, max activation, dominant head, ...)
feature_activations    sparse nonzero activations (dict, feature, context, pos, act)
feature_logits         top promoted / suppressed output tokens of a feature
feature_examples       the top activations of each feature (materialised examples)
feature_head_dfa       direct feature attribution by head (mean contribution and share)
feature_histograms     log-binned histogram of each feature's nonzero activations
attributions           scores per (method run, component, layer, head, pos, feature)
attribution_runs       the parameters and wall time of each attribution computation
graphs                 (v3 columns) attribution graphs: prompt, tokens, target, method, build parameters
graph_nodes            (v3 columns) nodes of a graph (embedding, feature, error, attention, logit)
graph_edges            (v3 columns) weighted edges; transcoder->transcoder edges keep their two factors
head_scores            (v2) per-head induction / previous-token / duplicate-token scores on random repeats
induction_prefix       (v2) induction heads vs matching-prefix length: attention to the target, direct effect
induction_classes      (v2) long- vs short-prefix classification of candidate induction heads (rule in stats)
head_features          (v2) features a head dominates by DFA share, with their rank and feature family
head_polysemanticity   (v2) per head: dominant features, families, polysemantic or not (rule in stats)
attribution_comparisons (v2) one task or clean/corrupt pair scored by several attribution methods
graph_views            (v5) a stored graph's saved view: thresholds, pins, hides, supernodes, node labels
                       (backend.circuits.view.ViewState as JSON), one row per graph
replacement_evals      (v3) CE loss with several MLPs replaced by their transcoders at once (v4: or by their
                       dense linear baselines; KL to the clean model, top-1 agreement, intervals in stats)
feature_labels         (v5) automatic short label of each live feature, computed from its stored statistics
user_labels            (v5) labels users wrote (written as saves beside the store; preferred over automatic ones)
=====================  ===========================================================================
"""

from __future__ import annotations

SCHEMA_VERSION = 5

# Each statement is idempotent so that opening an older (or the same) version for writing is safe.
DDL: list[str] = [
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, kind VARCHAR, model VARCHAR, preset VARCHAR, params JSON,
        status VARCHAR, started_at TIMESTAMP, finished_at TIMESTAMP, seconds DOUBLE, summary JSON)""",
    """CREATE TABLE IF NOT EXISTS models (
        model VARCHAR PRIMARY KEY, family VARCHAR, description VARCHAR, n_layers INTEGER, d_model INTEGER,
        n_heads INTEGER, n_kv_heads INTEGER, d_head INTEGER, d_mlp INTEGER, d_vocab INTEGER, n_ctx INTEGER,
        spec JSON, run_id VARCHAR)""",
    "CREATE TABLE IF NOT EXISTS vocab (model VARCHAR, token_id INTEGER, token_str VARCHAR, PRIMARY KEY (model, token_id))",
    """CREATE TABLE IF NOT EXISTS corpora (
        corpus_id VARCHAR PRIMARY KEY, model VARCHAR, source VARCHAR, description VARCHAR, licence VARCHAR,
        n_documents INTEGER, n_contexts INTEGER, n_ctx INTEGER, n_tokens BIGINT, mean_loss DOUBLE, run_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS contexts (
        corpus_id VARCHAR, context_id INTEGER, doc_id VARCHAR, run_id VARCHAR, PRIMARY KEY (corpus_id, context_id))""",
    """CREATE TABLE IF NOT EXISTS tokens (
        corpus_id VARCHAR, context_id INTEGER, pos SMALLINT, token_id INTEGER, loss REAL)""",
    """CREATE TABLE IF NOT EXISTS task_baselines (
        task VARCHAR, model VARCHAR, n_examples INTEGER, metric_name VARCHAR, clean_metric DOUBLE,
        corrupt_metric DOUBLE, example_prompt VARCHAR, run_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS dictionaries (
        dict_id VARCHAR PRIMARY KEY, model VARCHAR, kind VARCHAR, architecture VARCHAR, hook_name VARCHAR,
        layer INTEGER, d_in INTEGER, d_sae INTEGER, training_tokens BIGINT, l0 DOUBLE, fve DOUBLE,
        ce_clean DOUBLE, ce_spliced DOUBLE, ce_ablated DOUBLE, ce_loss_recovered DOUBLE, dead_fraction DOUBLE,
        eval_tokens BIGINT, source VARCHAR, cfg JSON, run_id VARCHAR, baseline_fve DOUBLE, baseline_ce_spliced DOUBLE)""",
    "CREATE TABLE IF NOT EXISTS dictionary_weights (dict_id VARCHAR PRIMARY KEY, format VARCHAR, data BLOB)",
    # Feature tables (attention-SAE and transcoder features, backend/features/step.py; top_head is NULL and
    # feature_head_dfa empty for transcoders; stats.scored_tokens says how many tokens were scored). BOS (position 0)
    # is never scored: density is over non-BOS tokens, and no activation, example or histogram count comes from it.
    """CREATE TABLE IF NOT EXISTS features (
        dict_id VARCHAR, feature INTEGER, n_active BIGINT, density DOUBLE, max_act REAL, mean_act REAL,
        top_head INTEGER, top_head_share REAL, stats JSON, PRIMARY KEY (dict_id, feature))""",
    # Only nonzero activations; rows are inserted sorted by (dict_id, feature, act DESC).
    """CREATE TABLE IF NOT EXISTS feature_activations (
        dict_id VARCHAR, feature INTEGER, corpus_id VARCHAR, context_id INTEGER, pos SMALLINT, act REAL)""",
    # The top activations of each feature (rank 1 = largest), materialised for fast example and token-text lookups.
    """CREATE TABLE IF NOT EXISTS feature_examples (
        dict_id VARCHAR, feature INTEGER, rank SMALLINT, corpus_id VARCHAR, context_id INTEGER, pos SMALLINT,
        act REAL)""",
    # kind: 'promoted' (largest direct logit effect) or 'suppressed' (most negative); rank 1 = strongest.
    """CREATE TABLE IF NOT EXISTS feature_logits (
        dict_id VARCHAR, feature INTEGER, kind VARCHAR, rank SMALLINT, token_id INTEGER, value REAL)""",
    # DFA by head: mean signed contribution to the pre-activation over the feature's top activations, and the
    # share |contribution| / sum over heads of |contribution|.
    """CREATE TABLE IF NOT EXISTS feature_head_dfa (
        dict_id VARCHAR, feature INTEGER, head INTEGER, contribution REAL, share REAL, n_examples INTEGER)""",
    # Histogram of a feature's nonzero activations in log-spaced bins [lo, hi) between its min and max.
    """CREATE TABLE IF NOT EXISTS feature_histograms (
        dict_id VARCHAR, feature INTEGER, bin SMALLINT, lo REAL, hi REAL, count INTEGER)""",
    # comparison_id (v2, last so v1 tables upgraded by ALTER keep the same column order) groups the methods run
    # on the same prompts, so pages compare estimates with activation patching within one comparison.
    """CREATE TABLE IF NOT EXISTS attribution_runs (
        attr_id VARCHAR PRIMARY KEY, task VARCHAR, method VARCHAR, model VARCHAR, params JSON, seconds DOUBLE,
        clean_metric DOUBLE, corrupt_metric DOUBLE, run_id VARCHAR, comparison_id VARCHAR)""",
    """CREATE TABLE IF NOT EXISTS attributions (
        attr_id VARCHAR, component VARCHAR, layer INTEGER, head INTEGER, pos INTEGER, feature INTEGER, score DOUBLE)""",
    # Attribution graphs (backend/circuits). graphs.metadata holds the prompt tokens, the target's metric values,
    # the dictionaries used and the build parameters; a graph is stored as built (before pruning: thresholds are
    # applied when it is viewed). source: 'precompute', 'cli' or 'app'.
    """CREATE TABLE IF NOT EXISTS graphs (
        graph_id VARCHAR PRIMARY KEY, model VARCHAR, prompt VARCHAR, target JSON, method VARCHAR, params JSON,
        created_at TIMESTAMP, run_id VARCHAR, metadata JSON, source VARCHAR, title VARCHAR)""",
    # feature: the feature index (transcoder / attention-SAE nodes), head index (head nodes), token id (embedding
    # and logit nodes). value: what the node's incoming edges sum to (with bias); attribution: the node's total
    # effect on the target (all paths); see backend/circuits/graph.py.
    """CREATE TABLE IF NOT EXISTS graph_nodes (
        graph_id VARCHAR, node_id VARCHAR, kind VARCHAR, layer INTEGER, pos INTEGER, feature INTEGER,
        activation DOUBLE, influence DOUBLE, label VARCHAR, dict_id VARCHAR, value DOUBLE, bias DOUBLE,
        is_target BOOLEAN, attribution DOUBLE)""",
    # weight = source_factor x invariant x norm_factor for transcoder -> transcoder edges (Dunefsky et al.:
    # input-dependent source activation x input-invariant decoder.encoder x the frozen norm's 1/scale);
    # NULL factors elsewhere.
    """CREATE TABLE IF NOT EXISTS graph_edges (
        graph_id VARCHAR, source VARCHAR, target VARCHAR, weight DOUBLE, invariant DOUBLE, source_factor DOUBLE,
        norm_factor DOUBLE)""",
    # ---- v5: what a person chose to see of a stored graph (saved from the Circuit Graph page, the API or an import)
    """CREATE TABLE IF NOT EXISTS graph_views (
        graph_id VARCHAR PRIMARY KEY, view JSON, saved_at TIMESTAMP, run_id VARCHAR)""",
    # ---- v2: head analyses (induction heads, head polysemanticity) and attribution comparisons ----
    """CREATE TABLE IF NOT EXISTS head_scores (
        model VARCHAR, layer INTEGER, head INTEGER, induction REAL, prev_token REAL, duplicate_token REAL,
        n_sequences INTEGER, seq_len INTEGER, run_id VARCHAR)""",
    # Induction heads (backend/heads/induction.py, exact definitions in its docstring). condition: 'prefix' (exactly
    # prefix_len tokens ending at the repeated token match its earlier occurrence; 0 = control, nothing matches),
    # 'competition_long' / 'competition_short' (two earlier occurrences, one with the long matching prefix, one where
    # only the token itself matches: the target after each). seq_len: tokens per probe sequence, BOS included.
    """CREATE TABLE IF NOT EXISTS induction_prefix (
        model VARCHAR, layer INTEGER, head INTEGER, condition VARCHAR, prefix_len INTEGER, attention REAL,
        direct_effect REAL, n_sequences INTEGER, run_id VARCHAR, seq_len INTEGER)""",
    """CREATE TABLE IF NOT EXISTS induction_classes (
        model VARCHAR, layer INTEGER, head INTEGER, head_class VARCHAR, stats JSON, run_id VARCHAR)""",
    # Head polysemanticity (backend/heads/polysemanticity.py). head_features: every feature whose DFA share in the head
    # passes the dominance rule; rank 1 = largest share; family is NULL beyond the judged top features.
    """CREATE TABLE IF NOT EXISTS head_features (
        dict_id VARCHAR, layer INTEGER, head INTEGER, feature INTEGER, share REAL, family INTEGER, rank INTEGER)""",
    # n_families counts families of >= 2 features among the n_judged top features; polysemantic is NULL when the
    # head has too few dominant features to judge; stats holds the thresholds, family sizes and similarity links.
    """CREATE TABLE IF NOT EXISTS head_polysemanticity (
        dict_id VARCHAR, layer INTEGER, head INTEGER, n_dominant INTEGER, n_judged INTEGER, n_families INTEGER,
        n_singletons INTEGER, polysemantic BOOLEAN, stats JSON, run_id VARCHAR)""",
    # source: 'precompute', 'cli' or 'app'; clean_tokens / corrupt_tokens: the token ids [n_examples][seq] (pages
    # label positions through `vocab`). Scores are stored for every component, zeros included (see
    # backend/attribution/compare.py), so that methods can be correlated with SQL corr().
    """CREATE TABLE IF NOT EXISTS attribution_comparisons (
        comparison_id VARCHAR PRIMARY KEY, task VARCHAR, model VARCHAR, metric_name VARCHAR, n_examples INTEGER,
        clean_prompts JSON, corrupt_prompts JSON, clean_metric DOUBLE, corrupt_metric DOUBLE, params JSON,
        created_at TIMESTAMP, run_id VARCHAR, source VARCHAR, clean_tokens JSON, corrupt_tokens JSON)""",
    # ---- v3: transcoders and attribution graphs ----
    # One row per evaluation of a set of transcoders spliced in together (dict_ids: JSON list): clean CE, CE with
    # every listed MLP replaced (error dropped), CE with those MLPs' outputs zeroed; the ratio as for dictionaries.
    # replacement: 'transcoder' or 'linear' (each MLP replaced by its dense linear baseline); kl: mean KL(clean ||
    # replaced) of the next-token distribution, top1: share of tokens whose top prediction is unchanged; stats holds
    # 95% bootstrap intervals over the held-out contexts.
    """CREATE TABLE IF NOT EXISTS replacement_evals (
        eval_id VARCHAR PRIMARY KEY, model VARCHAR, dict_ids JSON, n_replaced INTEGER, ce_clean DOUBLE,
        ce_replaced DOUBLE, ce_ablated DOUBLE, ce_loss_recovered DOUBLE, ce_tokens BIGINT, stats JSON,
        run_id VARCHAR, replacement VARCHAR, kl DOUBLE, top1 DOUBLE)""",
    # ---- v5: feature labels (backend/features/labels.py) ----
    # One automatic label per live feature, from its top examples' tokens and contexts and its top promoted token;
    # stats holds the figures the label was made from. Written by the precompute's labels step or by a
    # `python -m backend label` run.
    """CREATE TABLE IF NOT EXISTS feature_labels (
        dict_id VARCHAR, feature INTEGER, label VARCHAR, stats JSON, run_id VARCHAR)""",
    # A label a user wrote (saves only). label_key = dict_id || '#' || feature: the key under which a newer save
    # replaces an older one; an empty label removes the user's label (the automatic one shows again).
    """CREATE TABLE IF NOT EXISTS user_labels (
        label_key VARCHAR, dict_id VARCHAR, feature INTEGER, label VARCHAR, created_at TIMESTAMP, run_id VARCHAR)""",
]

# Indexes for the page queries that must stay fast on large stores (feature page: by dict + feature).
INDEXES: list[str] = [
    "CREATE INDEX IF NOT EXISTS idx_tokens_ctx ON tokens (corpus_id, context_id)",
    "CREATE INDEX IF NOT EXISTS idx_featacts_feat ON feature_activations (dict_id, feature)",
    "CREATE INDEX IF NOT EXISTS idx_featex_feat ON feature_examples (dict_id, feature)",
    "CREATE INDEX IF NOT EXISTS idx_featlogits_feat ON feature_logits (dict_id, feature)",
    "CREATE INDEX IF NOT EXISTS idx_featdfa_feat ON feature_head_dfa (dict_id, feature)",
    "CREATE INDEX IF NOT EXISTS idx_feathist_feat ON feature_histograms (dict_id, feature)",
    "CREATE INDEX IF NOT EXISTS idx_attr ON attributions (attr_id)",
    "CREATE INDEX IF NOT EXISTS idx_graph_nodes ON graph_nodes (graph_id)",
    "CREATE INDEX IF NOT EXISTS idx_graph_edges ON graph_edges (graph_id)",
    "CREATE INDEX IF NOT EXISTS idx_attr_runs_cmp ON attribution_runs (comparison_id)",
    "CREATE INDEX IF NOT EXISTS idx_featlabels_feat ON feature_labels (dict_id, feature)",
]

# Tables whose rows belong to a run, and so are deleted when a run is replaced.
RUN_TABLES: list[str] = [
    "models", "corpora", "contexts", "task_baselines", "dictionaries", "attribution_runs", "graphs",
    "head_scores", "induction_prefix", "induction_classes", "head_polysemanticity", "attribution_comparisons",
    "replacement_evals",
]

# version -> columns (table, "name TYPE") that version added to tables older versions already had. Writers upgrade
# an older store with ALTER TABLE (MIGRATIONS); readers, which never write, see older stores through temporary views
# that add these columns as NULL (backend.store.access), so every query reads every version.
ADDED_COLUMNS: dict[int, list[tuple[str, str]]] = {
    2: [("attribution_runs", "comparison_id VARCHAR")],
    3: [("graphs", "metadata JSON"), ("graphs", "source VARCHAR"), ("graphs", "title VARCHAR"),
        ("graph_nodes", "dict_id VARCHAR"), ("graph_nodes", "value DOUBLE"), ("graph_nodes", "bias DOUBLE"),
        ("graph_nodes", "is_target BOOLEAN"), ("graph_nodes", "attribution DOUBLE"),
        ("graph_edges", "source_factor DOUBLE"), ("graph_edges", "norm_factor DOUBLE")],
    4: [("dictionaries", "baseline_fve DOUBLE"), ("dictionaries", "baseline_ce_spliced DOUBLE"),
        ("replacement_evals", "replacement VARCHAR"), ("replacement_evals", "kl DOUBLE"),
        ("replacement_evals", "top1 DOUBLE")],
}

# version -> statements upgrading the previous version to it. They run after the DDL above (which creates tables new
# in that version), so they only change tables that already existed.
MIGRATIONS: dict[int, list[str]] = {
    version: [f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}" for table, column in columns]
    for version, columns in ADDED_COLUMNS.items()
}

EXPECTED_TABLES: frozenset[str] = frozenset(
    stmt.split("EXISTS ", 1)[1].split(" ", 1)[0].strip() for stmt in DDL
)

# The progress of the run a writer is building, kept only in its staging copy (backend.store.access.StoreWriter) and
# dropped when the run is committed, so no committed store has it and the schema version does not change. One row per
# finished unit of work: a step as a whole (layer NULL) or one layer of a step that works layer by layer, with what
# a resumed run needs to go on from it (``info``: JSON; ``state``: a safetensors blob of tensors, never pickle).
PROGRESS_TABLE = "run_progress"
PROGRESS_DDL = (f"CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} (run_id VARCHAR, step VARCHAR, layer INTEGER, "
                "finished_at TIMESTAMP, info JSON, state BLOB)")

# Tables every store has had since schema v1 and that opening a store reads (backend.store.queries.summary): a store
# without one of them is damaged or was not written by circuitscope.
CORE_TABLES: frozenset[str] = frozenset({"meta", "runs", "models", "corpora", "dictionaries", "task_baselines"})
