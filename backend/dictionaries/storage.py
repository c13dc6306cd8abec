"""Dictionaries in the store and on disk: the ``dictionaries`` / ``dictionary_weights`` rows of every kind, and
imports of sae-lens releases and sae-lens-format directories.

A dictionary is stored as one ``dictionaries`` row (metrics + the sae-lens config as JSON) and one
``dictionary_weights`` row (the state dict as a safetensors blob: a safe format, no pickle); sae-lens' ``SAE.from_dict``
rebuilds the right class (SAE, Transcoder, ...) from the config's ``architecture``. The loaders below are what every
capability that runs dictionaries (features, attribution, circuits, pages) reads them through.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from backend.dictionaries.kinds import ATTN_SAE, TRANSCODER
from backend.errors import InputError, ModelUnavailableError, StoreError
from backend.model.device import resolve_device
from backend.paths import CACHE_DIR

# Dictionary weights read from stores, as safetensors files (see load_dictionaries): git-ignored, like the model cache.
WEIGHTS_CACHE: Path = CACHE_DIR / "dictionaries"

if TYPE_CHECKING:
    import duckdb
    from sae_lens import SAE, Transcoder



def load_transcoders(con: Any, model_name: str) -> dict[int, "Transcoder"]:
    """Every transcoder of ``model_name`` in the store, by layer (eval mode, float32, on the device of :func:`backend.model.device.resolve_device`).

    Where a layer has several (different widths or sources), the one written by the most recent run wins (ties:
    smallest dict_id). Each transcoder's ``cfg.metadata.dict_id`` is set to its store dict_id (graph nodes cite it).
    """
    return load_by_layer(con, transcoder_ids(con, model_name))


def transcoder_ids(con: Any, model_name: str) -> dict[int, str]:
    """The dict_ids :func:`load_transcoders` would load, by layer, without loading any weights."""
    return _first_per_layer(con.execute(
        "SELECT d.layer, d.dict_id FROM dictionaries d LEFT JOIN runs r USING (run_id) "
        "WHERE d.model = ? AND d.kind = ? ORDER BY d.layer, r.started_at DESC NULLS LAST, d.dict_id",
        [model_name, TRANSCODER]).fetchall())


def load_local_transcoder(path: str) -> "Transcoder":
    """Load a sae-lens-format transcoder directory (``cfg.json`` + ``sae_weights.safetensors``, as written by
    sae-lens' ``save_model`` / ``save_inference_model``)."""
    from sae_lens import Transcoder

    tc = load_local(path, what="transcoder")
    if not isinstance(tc, Transcoder):
        raise InputError(f"{path} holds a sae-lens {tc.cfg.architecture()!r} SAE, not a transcoder: pass it with --saes instead.")
    return tc.eval()


def release_ids(release: str, layers: Sequence[int]) -> list[str]:
    """For ``RELEASE`` pick, per layer, the first sae_id of the release naming that layer (``layer_L`` or
    ``blocks.L.``); ``RELEASE:SAE_ID`` names one transcoder explicitly. Unknown release: one InputError sentence."""
    import re

    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    name, _, explicit = release.partition(":")
    directory = get_pretrained_saes_directory()
    if name not in directory:
        examples = [r for r in directory if "transcoder" in r][:2]
        raise InputError(f"Unknown sae-lens release {name!r}: pass a transcoder release from sae-lens' "
                         f"pretrained_saes.yaml (e.g. {', '.join(examples)}) or a sae-lens transcoder directory.")
    ids = list(directory[name].saes_map)
    if explicit:
        if explicit not in ids:
            raise InputError(f"Release {name!r} has no transcoder {explicit!r}: use one of {', '.join(ids[:4])}, ...")
        return [explicit]
    picked = []
    for layer in layers:
        pattern = re.compile(rf"(?:^|[/_.])(?:layer_{layer}|blocks\.{layer}\.)(?:$|[/_.])")
        match = next((i for i in ids if pattern.search(i)), None)
        if match is not None:
            picked.append(match)
    if not picked:
        raise InputError(f"Release {name!r} has no transcoder for layer(s) {list(layers)}: name one as {name}:SAE_ID.")
    return picked


def load_pretrained_transcoder(release: str, sae_id: str) -> "Transcoder":
    """One transcoder of a sae-lens release, from the HF cache or the hub; offline with nothing cached -> one
    ModelUnavailableError sentence (backend.dictionaries.load_pretrained does the probing)."""
    from sae_lens import Transcoder

    try:
        tc = load_pretrained(release, sae_id)
    except ModelUnavailableError as exc:
        raise ModelUnavailableError(str(exc).replace("SAE ", "Transcoder ", 1)) from None
    if not isinstance(tc, Transcoder):
        raise InputError(f"{release}/{sae_id} is a sae-lens {tc.cfg.architecture()!r} SAE, not a transcoder: use --saes for SAEs.")
    return tc


def sae_config_json(sae: "SAE") -> str:
    """The SAE's sae-lens config (architecture, widths, metadata incl. training facts) as JSON."""
    return json.dumps(sae.cfg.to_dict(), default=str, sort_keys=True)


# Dictionary weights are stored in half precision: they were 80% of a store's bytes in float32. Every dictionary is
# rounded to it (:func:`to_stored_precision`) before it is evaluated, so the metrics stored beside it describe
# exactly the weights a reader loads back (as float32).
STORED_DTYPE = "float16"


def to_stored_precision(sae: "SAE") -> "SAE":
    """Round ``sae``'s floating-point parameters and buffers in place to the precision they are stored in (values
    stay float32) and return it; call before evaluating a dictionary that will be saved."""
    import torch

    dtype = getattr(torch, STORED_DTYPE)
    with torch.no_grad():
        for t in [*sae.parameters(), *sae.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(dtype).to(t.dtype))
    return sae


def save_dictionary(writer: Any, sae: "SAE", row: dict[str, Any], weights: bool = True) -> None:
    """Write one dictionary: the ``dictionaries`` row (``row`` + cfg JSON + run id, replacing any row with the
    same ``dict_id``) and its weights as a safetensors blob in ``dictionary_weights`` (in :data:`STORED_DTYPE`).
    ``weights=False`` replaces the row only (a dictionary whose weights this run already stored, now evaluated)."""
    import pandas as pd
    from safetensors.torch import save

    dict_id = row["dict_id"]
    con = writer.con
    columns = [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'dictionaries' "
        "ORDER BY ordinal_position").fetchall()]
    full = {c: None for c in columns}
    full.update({k: v for k, v in row.items() if k in full})
    full["cfg"] = sae_config_json(sae)
    full["run_id"] = writer.run_id
    full["kind"] = full["kind"] or ATTN_SAE
    full["d_in"], full["d_sae"] = int(sae.cfg.d_in), int(sae.cfg.d_sae)
    con.execute("DELETE FROM dictionaries WHERE dict_id = ?", [dict_id])
    writer.insert_df("dictionaries", pd.DataFrame([{k: v for k, v in full.items() if v is not None}]))
    if not weights:
        return
    con.execute("DELETE FROM dictionary_weights WHERE dict_id = ?", [dict_id])
    import torch

    dtype = getattr(torch, STORED_DTYPE)
    blob = save({k: v.detach().to(dtype).cpu().contiguous() if v.is_floating_point() else v.detach().cpu().contiguous()
                 for k, v in sae.state_dict().items()})
    con.execute("INSERT INTO dictionary_weights VALUES (?, 'safetensors', ?)", [dict_id, blob])


def load_dictionary(con: Any, dict_id: str) -> "SAE":
    """Rebuild the sae-lens SAE stored under ``dict_id`` (eval mode, float32, on the device of :func:`backend.model.device.resolve_device`)."""
    return load_dictionaries(con, [dict_id])[dict_id]


def load_dictionaries(con: Any, dict_ids: Sequence[str], cache: bool = True) -> dict[str, "SAE"]:
    """Rebuild the sae-lens SAEs stored under ``dict_ids`` (eval mode, float32, on the device of :func:`backend.model.device.resolve_device`), by dict_id.

    Reading a weights blob out of DuckDB runs at tens of MB/s here — seconds for the ~30 dictionaries of a graph —
    so each blob, once read, is also written to :data:`WEIGHTS_CACHE` as the safetensors file it already is, keyed by
    its dict_id and the run that wrote it (a dictionary rewritten by a later run gets a new run id, hence a new file);
    later loads read that file from disk instead. Dictionaries without a run id, or all with ``cache=False`` (a run
    reading back what it is writing), are always read from the store.
    """
    wanted = sorted(set(dict_ids))
    if not wanted:
        return {}
    marks = ", ".join("?" * len(wanted))
    rows = con.execute(f"SELECT d.dict_id, d.cfg, d.run_id, w.format FROM dictionaries d JOIN dictionary_weights w "
                       f"USING (dict_id) WHERE d.dict_id IN ({marks})", wanted).fetchall()
    found = {r[0]: r[1:] for r in rows}
    missing = [d for d in wanted if d not in found]
    if missing:
        raise StoreError(f"This store has no dictionary {missing[0]!r}: pick one listed on the home page, or re-run "
                         "the precompute.")
    cached = {d: _cache_file(d, run_id, cfg) for d, (cfg, run_id, fmt) in found.items()
              if fmt == "safetensors" and cache}
    device = str(resolve_device())
    out: dict[str, Any] = {}
    for d in wanted:
        path = cached.get(d)
        if path is not None and path.is_file():
            try:
                out[d] = _rebuild(d, found[d][0], found[d][2], device, None, path)
                os.utime(path)  # recently used: kept when the cache is trimmed
            except Exception:  # noqa: BLE001 - an unreadable cache file is read again from the store
                out.pop(d, None)
    to_read = [d for d in wanted if d not in out]
    if to_read:
        marks = ", ".join("?" * len(to_read))
        for d, data in con.execute(f"SELECT dict_id, data FROM dictionary_weights WHERE dict_id IN ({marks})",
                                   to_read).fetchall():
            blob = bytes(data)
            out[d] = _rebuild(d, found[d][0], found[d][2], device, blob)
            if cached.get(d) is not None:
                _write_cache(cached[d], blob)
    return out


WEIGHTS_CACHE_BYTES = 2 * 1024**3  # the cache is trimmed, least recently used first, beyond this size


def _cache_file(dict_id: str, run_id: Any, cfg_json: str) -> "Path | None":
    import hashlib

    if not run_id:
        return None
    key = hashlib.sha1(f"{dict_id}\0{run_id}\0{cfg_json}".encode()).hexdigest()[:24]
    return WEIGHTS_CACHE / f"{key}.safetensors"


def _write_cache(path: "Path", blob: bytes) -> None:
    """Write a weights file atomically (a crash mid-write leaves no half file), then trim the cache to
    :data:`WEIGHTS_CACHE_BYTES`; a read-only or full disk only means no cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
        files = sorted(path.parent.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
        total = 0
        for f in files:
            total += f.stat().st_size
            if total > WEIGHTS_CACHE_BYTES and f != path:
                f.unlink(missing_ok=True)
    except OSError:
        pass


def _rebuild(dict_id: str, cfg_json: str, fmt: str, device: str, blob: bytes | None,
             path: "Path | None" = None) -> "SAE":
    """A sae-lens SAE on ``device`` from its stored config and safetensors weights (the blob, or the cached file
    ``path``).

    As sae-lens' own loaders do, the object is built on PyTorch's ``meta`` device and the stored tensors are then
    assigned to it, so no random initialisation runs only to be overwritten. If a class keeps a tensor outside its
    state dict, that tensor would stay on ``meta``: such a class is built the ordinary way instead.
    """
    import torch
    from sae_lens import SAE
    from safetensors.torch import load, load_file

    if fmt != "safetensors":
        raise StoreError(f"Dictionary {dict_id!r} is stored as {fmt!r}, which circuitscope does not load (only safetensors).")
    cfg = json.loads(cfg_json)
    cfg["dtype"] = "float32"
    tensors = load(blob) if blob is not None else load_file(str(path))
    state = {k: v.to(torch.float32) for k, v in tensors.items()}
    sae = SAE.from_dict({**cfg, "device": "meta"})
    sae.cfg.device = device
    sae.load_state_dict(state, assign=True)
    sae = sae.to(device=device)
    if any(t.is_meta for t in [*sae.parameters(), *sae.buffers()]):
        sae = SAE.from_dict({**cfg, "device": device})
        sae.load_state_dict(state)
    return sae.eval()


def load_pretrained(release: str, sae_id: str) -> "SAE":
    """Load a sae-lens release (e.g. ``("gpt2-small-hook-z-kk", "blocks.5.hook_z")``) from the HF cache or hub.

    Offline with nothing cached -> one :class:`ModelUnavailableError` sentence, quickly (the hub is probed once
    and Hugging Face is switched to offline mode, so nothing retries).
    """
    from backend.model.registry import configure_hf_cache

    configure_hf_cache()
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise InputError(f"Unknown sae-lens release {release!r}: use a name from sae-lens' pretrained_saes.yaml, e.g. 'gpt2-small-hook-z-kk'.")
    ids = list(directory[release].saes_map)
    if sae_id not in ids:
        raise InputError(f"Release {release!r} has no SAE {sae_id!r}: use one of {', '.join(ids[:4])}, ...")
    try:
        sae = SAE.from_pretrained(release, sae_id, device=str(resolve_device()), dtype="float32")
    except Exception as exc:  # noqa: BLE001 - offline/hub failures come as OSError, HTTP or hub errors
        raise ModelUnavailableError(
            f"SAE {release}/{sae_id} is not available: it is not in the local Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the hub cannot be reached "
            f"({type(exc).__name__}); run once with internet access or copy the cache there."
        ) from None
    return sae.eval()


def load_local(path: str | Path, what: str = "SAE") -> "SAE":
    """Load a sae-lens-format directory (``cfg.json`` + ``sae_weights.safetensors``); ``what`` names the kind of
    dictionary in the error messages (e.g. "transcoder")."""
    from sae_lens import SAE

    path = Path(path)
    if not (path / "cfg.json").is_file() or not (path / "sae_weights.safetensors").is_file():
        raise InputError(f"{path} is not a sae-lens {what} directory: it needs cfg.json and sae_weights.safetensors.")
    try:
        sae = SAE.load_from_disk(path, device=str(resolve_device()), dtype="float32")
    except Exception as exc:  # noqa: BLE001 - malformed configs raise many types
        raise InputError(f"{path} could not be loaded as a sae-lens {what} ({type(exc).__name__}: {str(exc)[:120]}).") from None
    return sae.eval()


def attention_sae_ids(con: "duckdb.DuckDBPyConnection", model_name: str) -> dict[int, str]:
    """The attention SAE each layer of ``model_name`` uses (the widest; ties: smallest dict_id), by layer."""
    return _first_per_layer(con.execute("SELECT layer, dict_id FROM dictionaries WHERE model = ? AND kind = ? "
                                        "ORDER BY layer, d_sae DESC, dict_id", [model_name, ATTN_SAE]).fetchall())


def _first_per_layer(rows: Sequence[tuple[Any, Any]]) -> dict[int, str]:
    """``{layer: dict_id}`` from ``(layer, dict_id)`` rows in preference order: the first row of each layer wins."""
    out: dict[int, str] = {}
    for layer, dict_id in rows:
        out.setdefault(int(layer), str(dict_id))
    return out


def load_by_layer(con: "duckdb.DuckDBPyConnection", ids: dict[int, str]) -> dict[int, Any]:
    """Load ``{layer: dict_id}`` as ``{layer: sae-lens object}`` (:func:`load_dictionaries`); each one's
    ``cfg.metadata.dict_id`` is its store dict_id (graph nodes and comparisons cite it)."""
    loaded = load_dictionaries(con, list(ids.values()))
    out: dict[int, Any] = {}
    for layer, dict_id in ids.items():
        dictionary = loaded[dict_id]
        dictionary.cfg.metadata.dict_id = dict_id
        out[layer] = dictionary
    return out


def load_attention_saes(con: "duckdb.DuckDBPyConnection", model_name: str) -> dict[int, "SAE"]:
    """The attention SAEs of :func:`attention_sae_ids`, loaded (eval mode, float32, on the device of :func:`backend.model.device.resolve_device`), by layer; each one's
    ``cfg.metadata.dict_id`` is its store dict_id."""
    return load_by_layer(con, attention_sae_ids(con, model_name))


def graph_dictionaries(con: "duckdb.DuckDBPyConnection", model_name: str, attn_saes: bool = True
                       ) -> tuple[dict[int, "Transcoder"], dict[int, "SAE"]]:
    """What an attribution graph of ``model_name`` replaces: ``({layer: transcoder}, {layer: attention SAE})`` (the
    SAEs only if ``attn_saes``). A store without transcoders still builds graphs: every MLP is then an error node."""
    return load_transcoders(con, model_name), (load_attention_saes(con, model_name) if attn_saes else {})


def export_sae_lens(con: "duckdb.DuckDBPyConnection", dict_id: str, directory: str | Path) -> Path:
    """Write the stored dictionary ``dict_id`` as a sae-lens directory (``cfg.json`` + ``sae_weights.safetensors``,
    sae-lens' own ``save_model``) that ``sae_lens.SAE.load_from_disk`` reads back as the same class (an SAE, a
    Transcoder, a skip transcoder, ...). ``directory`` is created; an existing one must be empty, its parent must
    exist. Returns the directory."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        raise InputError(f"Cannot write {directory}: the directory {directory.parent} does not exist.")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise InputError(f"Cannot export into {directory}: give a new or empty directory.")
    sae = load_dictionary(con, dict_id).to("cpu")
    sae.cfg.device = "cpu"
    sae.save_model(directory)
    return directory


def sae_lens_zip(con: "duckdb.DuckDBPyConnection", dict_id: str) -> bytes:
    """:func:`export_sae_lens` as one zip archive of the two files (the Feature Browser's download)."""
    import io
    import tempfile
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        out = export_sae_lens(con, dict_id, Path(tmp) / "sae")
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(out.iterdir()):
                zf.write(f, f.name)
    return buf.getvalue()
