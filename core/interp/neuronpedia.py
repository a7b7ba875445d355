"""A feature store as the JSON Neuronpedia and SAEDashboard load, and read back.

Layout: one folder per Neuronpedia *source* (one layer of a set), as SAEDashboard's Neuronpedia
runner writes them and Neuronpedia's importer reads them::

    DIR/{layer}-{sae_set}/           e.g. 3-gptlab-tc
        batch-{n}.json               features n*128 .. n*128+127 (128: Neuronpedia's upload batch)
        explanations.json            explanations with their scores
        run_settings.json            what the export was made from

``batch-{n}.json`` is SAEDashboard's ``NeuronpediaDashboardBatch.to_dict()``, every key present::

    {"model_id": str, "layer": int, "sae_set": str, "sae_id_suffix": null,
     "features": [{
        "feature_index": int,
        "frac_nonzero": float,                   # density: share of tokens the feature fires on
        "pos_str": [str], "pos_values": [float], # output tokens it promotes, with their logit effects
        "neg_str": [str], "neg_values": [float], # ... and suppresses (negative values)
        "freq_hist_data_bar_values": [float],    # left edges of its activation histogram's bins (store.HIST_EDGES)
        "freq_hist_data_bar_heights": [int],     # the counts in them
        "n_prompts_total": int,                  # windows the collection scanned
        "n_tokens_in_prompt": int,               # tokens per window
        "dataset": str,                          # the corpus
        "activations": [{                        # top contexts (rank order), then quantile samples (rank order)
            "tokens": [str],                     # the window's tokens as text
            "values": [float],                   # the feature's activation on each of them
            "qualifying_token_index": int,       # the token the window was cut around
            "bin_min": float, "bin_max": float, "bin_contains": float}],
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "decoder_weights_dist": [], "vector": []}]}

Bins, as SAEDashboard marks them: a top context has ``bin_min = bin_contains = -1`` and ``bin_max``
its activation at the qualifying token. A quantile sample ``j`` (sorted by activation, at quantile
``q_j`` of the feature's activating samples) is the interval from the previous sample's activation
(``bin_min``, 0 for the first) to its own (``bin_max``), holding ``bin_contains = q_j - q_{j-1}``
(``q_0`` for the first) of the activating tokens; ``q_j`` is their running sum. Lists SAEDashboard
fills from quantities GPT Lab does not measure (neuron alignment, correlations, logit histogram,
decoder weights by head) are empty. Values are the store's own floats, unrounded.

``explanations.json`` is a list of Neuronpedia explanation records, one per feature and explainer::

    [{"modelId": str, "layer": "{layer}-{sae_set}", "index": "17", "description": str,
      "typeName": "gptlab", "explanationModelName": explainer (builtin, lm:<model>, ...),
      "scores": [{"explanationScoreTypeName": "detection" | "simulation",
                  "explanationScoreModelName": explainer, "value": float | null, "n": int,
                  "jsonDetails": str (a JSON object)}]}]

``run_settings.json``: ``model_id``, ``layer``, ``sae_set``, ``source``, ``hook_name``,
``hook_name_out``, ``n_features``, ``n_prompts_total``, ``n_tokens_in_prompt``, ``dataset``, and a
``gptlab`` block (the store, the layer's quality, its description and the set's total one).
Torch-free: only the store is read.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LabError, first_line, shorten
from ..files import atomic_folder
from .config import NEURONPEDIA_SET, transcoder_hooks
from .store import HIST_EDGES, Context, FeatureStore, Score

BATCH_SIZE = 128
EXPLANATION_TYPE = "gptlab"
EXPLANATIONS_FILENAME = "explanations.json"
RUN_SETTINGS_FILENAME = "run_settings.json"
_EMPTY = ("neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices",
          "correlated_neurons_l1", "correlated_neurons_pearson", "correlated_features_indices",
          "correlated_features_l1", "correlated_features_pearson", "logits_hist_data_bar_heights",
          "logits_hist_data_bar_values", "decoder_weights_dist", "vector")


def source_name(layer: int, sae_set: str = NEURONPEDIA_SET) -> str:
    """Neuronpedia's name for one layer of a set: ``3-gptlab-tc``."""
    return f"{int(layer)}-{sae_set}"


def _activations(top: list[Context], quantiles: list[Context]) -> list[dict]:
    out = [{"bin_min": -1.0, "bin_max": float(c.activation), "bin_contains": -1.0, "tokens": list(c.tokens),
            "values": [float(v) for v in c.acts], "qualifying_token_index": int(c.position)} for c in top]
    prev_act, prev_q = 0.0, 0.0
    for c in quantiles:
        q = float(c.quantile) if c.quantile is not None else prev_q
        out.append({"bin_min": prev_act, "bin_max": float(c.activation), "bin_contains": q - prev_q,
                    "tokens": list(c.tokens), "values": [float(v) for v in c.acts],
                    "qualifying_token_index": int(c.position)})
        prev_act, prev_q = float(c.activation), q
    return out


def layer_json(store: FeatureStore, layer: int, *, model_id: str,
               sae_set: str = NEURONPEDIA_SET) -> tuple[list[dict], list[dict], dict]:
    """``(batches, explanation records, run settings)`` of one layer (see the module docstring)."""
    info = {l.layer: l for l in store.layers()}.get(layer)
    if info is None:
        raise LabError(f"The feature store {store.label} has no layer {layer}; it covers "
                       f"{[l.layer for l in store.layers()]}.")
    sets = store.sets()
    config = sets[-1]["config"] if sets else {}
    seq_len = int(config.get("seq_len") or 0)
    n_prompts = int(info.n_tokens or 0) // seq_len if seq_len else 0
    dataset = str(config.get("corpus") or (config.get("collect") or {}).get("dataset") or "")
    source = source_name(layer, sae_set)
    features = []
    for row in store.features(layer, order_by="feature", descending=False, include_dead=True):
        f = row.feature
        s = store.stats(layer, f)
        feat = {"feature_index": f, **{k: [] for k in _EMPTY},
                "neg_str": [t for t, _ in s.suppressed], "neg_values": [float(v) for _, v in s.suppressed],
                "pos_str": [t for t, _ in s.promoted], "pos_values": [float(v) for _, v in s.promoted],
                "frac_nonzero": float(s.density), "freq_hist_data_bar_values": [float(e) for e in HIST_EDGES],
                "freq_hist_data_bar_heights": [int(h) for h in s.hist], "n_prompts_total": n_prompts,
                "n_tokens_in_prompt": seq_len, "dataset": dataset,
                "activations": _activations(store.contexts(layer, f, "top"), store.contexts(layer, f, "quantile"))}
        features.append(feat)
    batches = [{"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": None,
                "features": features[i:i + BATCH_SIZE]} for i in range(0, max(len(features), 1), BATCH_SIZE)]
    records = []
    for explainer in sorted(store.explainers()):
        for f, text in sorted(store.explanations(layer, explainer).items()):
            scores = store.scores(layer, f).get(explainer, {})
            records.append({"modelId": model_id, "layer": source, "index": str(f), "description": text,
                            "typeName": EXPLANATION_TYPE, "explanationModelName": explainer,
                            "scores": [{"explanationScoreTypeName": m, "explanationScoreModelName": explainer,
                                        "value": sc.value, "n": sc.n, "jsonDetails": json.dumps(sc.details)}
                                       for m, sc in sorted(scores.items())]})
    hook_in, hook_out = transcoder_hooks(layer)
    quality = {k: getattr(info, k) for k in ("fve", "l0", "dead_fraction", "loss_clean", "loss_replaced",
                                             "loss_ablated", "loss_recovered", "n_tokens", "n_alive")}
    settings = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "source": source, "hook_name": hook_in,
                "hook_name_out": hook_out, "n_features": info.n_features, "n_prompts_total": n_prompts,
                "n_tokens_in_prompt": seq_len, "dataset": dataset,
                "gptlab": {"store": str(store.label), "model": sets[-1]["model"] if sets else "",
                           "set_folder": sets[-1]["folder"] if sets else None, "quality": quality,
                           "description": store.description("layer", layer),
                           "total_description": store.description("total")}}
    return batches, records, settings


def export_neuronpedia(store: FeatureStore, out: str | os.PathLike, *, model_id: str | None = None,
                       sae_set: str = NEURONPEDIA_SET, layers: list[int] | None = None) -> list[Path]:
    """Write the store's ``layers`` (default all) under ``out``, a new or empty folder that appears
    whole or not at all (:func:`core.files.atomic_folder`); returns the source folders."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", sae_set or ""):
        raise LabError(f"--sae-set must be letters, digits, '.', '_' or '-' (got {sae_set!r}): Neuronpedia names "
                       f"sources '<layer>-<set>'.")
    have = [l.layer for l in store.layers()]
    layers = have if layers is None else sorted(set(layers))
    missing = [i for i in layers if i not in have]
    if missing or not layers:
        raise LabError(f"--layers must name layers of the feature store, which covers {have} (got {layers}).")
    sets = store.sets()
    model_id = model_id or re.sub(r"[^A-Za-z0-9._-]+", "-", (sets[-1]["model"] if sets else "") or "model").strip("-")
    out = Path(out)
    files: dict[Path, object] = {}
    for i in layers:
        batches, records, settings = layer_json(store, i, model_id=model_id, sae_set=sae_set)
        folder = Path(source_name(i, sae_set))  # relative to out
        for n, batch in enumerate(batches):
            files[folder / f"batch-{n}.json"] = batch
        files[folder / EXPLANATIONS_FILENAME] = records
        files[folder / RUN_SETTINGS_FILENAME] = settings
    with atomic_folder(out) as tmp:
        for path, obj in files.items():
            compact = path.name.startswith("batch-")  # as SAEDashboard writes them: they are most of the bytes
            text = json.dumps(obj, separators=(",", ":")) if compact else json.dumps(obj, indent=2) + "\n"
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_text(text, encoding="utf-8")
    return [out / source_name(i, sae_set) for i in layers]


# -- reading it back ------------------------------------------------------------------------------

@dataclass
class DashboardFeature:
    """One feature as a Neuronpedia export tells it."""

    layer: int
    feature: int
    density: float
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    hist: list[int]
    top: list[Context]
    quantiles: list[Context]
    explanations: dict[str, str] = field(default_factory=dict)       # explainer -> text
    scores: dict[str, dict[str, Score]] = field(default_factory=dict)  # explainer -> {method: Score}


def _contexts(acts: list[dict]) -> tuple[list[Context], list[Context]]:
    top, quantiles = [], []
    q = 0.0
    for a in acts:
        tokens, values, pos = list(a["tokens"]), [float(v) for v in a["values"]], int(a["qualifying_token_index"])
        if a["bin_contains"] == -1 and a["bin_min"] == -1:
            top.append(Context("top", len(top), tokens, [], values, position=pos, activation=float(a["bin_max"])))
        else:
            q += float(a["bin_contains"])
            quantiles.append(Context("quantile", len(quantiles), tokens, [], values, position=pos,
                                     activation=float(a["bin_max"]), quantile=q))
    return top, quantiles


def _read(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to parse
        raise LabError(f"Cannot read {path} ({shorten(first_line(e), 120)}); export it again.") from None


def read_neuronpedia(folder: str | os.PathLike) -> dict[int, dict[int, DashboardFeature]]:
    """``{layer: {feature: DashboardFeature}}`` from an export folder (or one of its source folders)."""
    folder = Path(folder)
    sources = [folder] if (folder / RUN_SETTINGS_FILENAME).is_file() else sorted(
        p for p in folder.iterdir() if (p / RUN_SETTINGS_FILENAME).is_file())
    if not sources:
        raise LabError(f"No Neuronpedia export in {folder} (no {RUN_SETTINGS_FILENAME}); write one with "
                       f"`python -m core transcoders export --format neuronpedia`.")
    out: dict[int, dict[int, DashboardFeature]] = {}
    try:
        for src in sources:
            layer = int(_read(src / RUN_SETTINGS_FILENAME)["layer"])
            feats = out.setdefault(layer, {})
            batches = sorted(src.glob("batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
            for path in batches:
                for f in _read(path)["features"]:
                    top, quantiles = _contexts(f["activations"])
                    feats[int(f["feature_index"])] = DashboardFeature(
                        layer=layer, feature=int(f["feature_index"]), density=float(f["frac_nonzero"]),
                        promoted=list(zip(f["pos_str"], map(float, f["pos_values"]))),
                        suppressed=list(zip(f["neg_str"], map(float, f["neg_values"]))),
                        hist=[int(h) for h in f["freq_hist_data_bar_heights"]], top=top, quantiles=quantiles)
            if (src / EXPLANATIONS_FILENAME).is_file():
                for r in _read(src / EXPLANATIONS_FILENAME):
                    feat = feats[int(r["index"])]
                    ex = r["explanationModelName"]
                    feat.explanations[ex] = r["description"]
                    if r["scores"]:
                        feat.scores[ex] = {s["explanationScoreTypeName"]: Score(
                            method=s["explanationScoreTypeName"], value=s["value"], n=int(s["n"]),
                            details=json.loads(s["jsonDetails"]) if s.get("jsonDetails") else {}) for s in r["scores"]}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
        raise LabError(f"{folder} is not a Neuronpedia export GPT Lab wrote ({type(e).__name__}: "
                       f"{shorten(first_line(e), 120)}); export it again.") from None
    return out


__all__ = ["BATCH_SIZE", "DashboardFeature", "export_neuronpedia", "layer_json", "read_neuronpedia", "source_name"]
