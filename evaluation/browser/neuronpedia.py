"""The browser's statistics in Neuronpedia's bulk-import layout, so a sweep can be loaded into a
Neuronpedia instance without re-running anything:

    neuronpedia/{model_id}/{source_id}/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl      one record each
        features/batch-N.jsonl.gz  activations/batch-N.jsonl.gz       one record per latent / context

One Neuronpedia source per member, `{layer}-{set}__{member}` (the `__suffix` Neuronpedia gives
several dictionaries of one set at one layer), in a source set named after the run. Each record
carries exactly the fields of Neuronpedia's own exporter, the dataclasses of neuronpedia-utils'
`db_models` (SourceRelease, Model, SourceSet, Source, Feature, Activation), which its
`convert-saedashboard-to-neuronpedia-export.py` writes as gzip JSONL in this layout from SAEDashboard's
batch files; the webapp's importer (`/api/admin/import?modelId=…&sourceId=…`) reads the folder from its
dataset bucket and inserts the columns the records name.

Filled per feature: frac_nonzero (density), the activation histogram (freq_hist_data_bar_values /
_heights: bin centres and counts), pos_str / pos_values and neg_str / neg_values (the top and
bottom 10 logit effects, when the model could be loaded), maxActApprox (the largest activation
among its contexts). Per context (Activation): the ±8 tokens around the example token as strings,
the latent's activation on each, maxValue / maxValueTokenIndex / minValue as the exporter computes
them, qualifyingTokenIndex (the example's token), binMin / binMax / binContains (the top contexts
−1 / the latent's maximum / −1, as SAEDashboard marks them; then the quantile bands' samples with
their range and share). Left empty (not computed here): the neuron alignment, correlated neurons
and features, the logits histogram, decoder weight distribution, DFA values and steering vector.
The records name the creator every Neuronpedia instance seeds; the release's names and
descriptions are plain text to edit before importing.
"""
from __future__ import annotations

import gzip
import json
import math
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from evaluation.browser.collect import HALF, bin_edges

# The user every Neuronpedia instance seeds (apps/webapp/prisma/seed.ts) and takes as
# DEFAULT_CREATOR_USER_ID; neuronpedia-utils' exporter writes it as every record's creatorId.
CREATOR_ID = "clkht01d40000jv08hvalcvly"
CREATOR_NAME = "sae-sweep"


def neuronpedia_id(name: str) -> str:
    """A name as Neuronpedia ids are written: lower case letters, digits, `-` and `_` (a model's
    id is its name without the organisation: google/gemma-3-270m → gemma-3-270m)."""
    return re.sub(r"[^a-z0-9_-]+", "-", name.rsplit("/", 1)[-1].lower()).strip("-") or "unnamed"


def write_neuronpedia(target: Path, data: list, store, decode, shard: int, set_name: str,
                      hf_repo_id: str | None = None) -> list[Path]:
    """Write every member of `data` (evaluation.browser.MemberData) as a Neuronpedia source under
    target/{model_id}/; return the source directories. `hf_repo_id`: the Hub repository the members
    are pushed to (formats/hub.py), recorded as each source's weights."""
    info = store.info
    model_id, set_id = neuronpedia_id(info.get("model_name") or "model"), neuronpedia_id(set_name)
    created = datetime.now(timezone.utc).isoformat()
    shared = {"release.jsonl": _release(set_id, len(data), hf_repo_id, created),
              "model.jsonl": _model(model_id, info, created),
              "sourceset.jsonl": _source_set(model_id, set_id, data, created)}
    layers = [store.source((d.row.get("inputs") or [store.sources[0].name])[0]).layer or 0 for d in data]
    source_ids = [f"{layer}-{set_id}__{neuronpedia_id(d.row['name'])}" for layer, d in zip(layers, data)]
    if len(set(source_ids)) < len(source_ids):
        raise ValueError(f"members of {set_name} share a Neuronpedia source id ({', '.join(source_ids)}): rename them")
    directories = []
    for d, source_id in zip(data, source_ids):
        directory = target / model_id / source_id
        directories.append(directory)
        shutil.rmtree(directory, ignore_errors=True)  # a rerun leaves no batch of an earlier one
        records = {**shared, "source.jsonl": _source(model_id, set_id, source_id, d, info, hf_repo_id, created)}
        for name, record in records.items():
            _write_jsonl(directory / name, [record])
        bands = d.recorder.bands()
        for b, first in enumerate(range(0, d.recorder.F, shard)):
            features, activations = [], []
            for i in range(first, min(first + shard, d.recorder.F)):
                contexts = _activations(d, i, bands[i], decode, model_id, source_id, created)
                features.append(_feature(d, i, decode, model_id, set_id, source_id, contexts, created))
                activations += contexts
            _write_jsonl(directory / "features" / f"batch-{b}.jsonl.gz", features)
            _write_jsonl(directory / "activations" / f"batch-{b}.jsonl.gz", activations)
    return directories


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """JSON lines; gzip-compressed (level 5, as Neuronpedia's exporter) when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(text, compresslevel=5, mtime=0) if path.suffix == ".gz" else text)


def _release(set_id: str, n_members: int, hf_repo_id: str | None, created: str) -> dict:
    description = f"{n_members} sparse dictionaries of one sae-sweep run ({set_id})"
    return {"name": set_id, "description": description, "creatorName": CREATOR_NAME, "creatorId": CREATOR_ID,
            "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": description,
            "urls": [f"https://huggingface.co/{hf_repo_id}"] if hf_repo_id else [], "creatorEmail": None,
            "creatorNameShort": CREATOR_NAME, "defaultSourceSetName": set_id, "defaultSourceId": None,
            "defaultUmapSourceIds": [], "createdAt": created}


def _model(model_id: str, info: dict, created: str) -> dict:
    name = info.get("model_name") or model_id
    entry = info.get("models", [{}])[0]
    return {"id": model_id, "instruct": model_id.endswith("-it"), "creatorId": CREATOR_ID, "displayNameShort": model_id,
            "displayName": name, "tlensId": entry.get("model"), "dimension": entry.get("d_model"),
            "visibility": "PUBLIC", "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
            "layers": entry.get("n_layers") or 0, "neuronsPerLayer": 0, "createdAt": created,
            "owner": name.split("/")[0] if "/" in name else "", "updatedAt": created, "website": None}


def _source_set(model_id: str, set_id: str, data: list, created: str) -> dict:
    archs = ", ".join(dict.fromkeys(d.row.get("arch", "relu") for d in data))
    return {"modelId": model_id, "name": set_id, "creatorId": CREATOR_ID, "hasDashboards": True, "visibility": "PUBLIC",
            "description": f"sae-sweep: {len(data)} members ({archs})", "type": "", "creatorName": CREATOR_NAME,
            "urls": [], "creatorEmail": None, "releaseName": set_id, "defaultOfModelId": None, "defaultRange": 1,
            "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False, "showHeadAttribution": False,
            "showUmap": False, "createdAt": created}


def _source(model_id: str, set_id: str, source_id: str, d, info: dict, hf_repo_id: str | None, created: str) -> dict:
    n_sequences = d.recorder.n_tokens // max(1, info["context_length"] - (1 if info["exclude_bos"] else 0))
    row = d.row
    notes = ", ".join(f"{k} {row[k]:.4g}" for k in ("l0", "fvu", "ce_recovered") if isinstance(row.get(k), float))
    return {"id": source_id, "modelId": model_id, "setName": set_id, "creatorId": CREATOR_ID, "hasDashboards": True,
            "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None,
            "saelensRelease": hf_repo_id, "saelensSaeId": row["name"] if hf_repo_id else None,
            "hfRepoId": hf_repo_id, "hfFolderId": row["name"] if hf_repo_id else None, "visibility": "PUBLIC",
            "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
            "num_prompts": n_sequences, "num_tokens_in_prompt": 2 * HALF + 1, "dataset": info.get("dataset"),
            "notes": f"sae-sweep member {row['name']}" + (f": {notes}" if notes else ""), "createdAt": created}


def _activations(d, i: int, bands: list[dict], decode, model_id: str, source_id: str, created: str) -> list[dict]:
    """Latent i's contexts: the top ones, then the samples of its quantile `bands`."""
    rec = d.recorder

    def context(slot, j: int, tag: str, lo: float, hi: float, share: float) -> dict:
        tokens = slot.tokens[i, j].tolist()
        kept = [k for k, t in enumerate(tokens) if t >= 0]
        values = [round(float(slot.acts[i, j, k]), 3) for k in kept]
        top = max(values)
        return {"id": f"{model_id}@{source_id}@{i}@{tag}{j}", "tokens": [decode(tokens[k]) for k in kept],
                "index": str(i), "layer": source_id, "modelId": model_id, "maxValue": top,
                "maxValueTokenIndex": values.index(top), "minValue": min(values), "values": values,
                "creatorId": CREATOR_ID, "dataSource": None, "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None,
                "dfaMaxValue": None, "createdAt": created, "lossValues": [], "logitContributions": None,
                "binMin": lo, "binMax": hi, "binContains": share, "qualifyingTokenIndex": kept.index(HALF),
                "zIndices": None, "zValues": None}

    top = [context(rec.top, j, "top", -1, float(rec.max[i]), -1) for j in range(rec.top_k)
           if math.isfinite(float(rec.top.value[i, j]))]
    return top + [context(rec.sample, j, "sample", band["lo"], band["hi"], band["frac"])
                  for band in bands for j in band["samples"]]


def _feature(d, i: int, decode, model_id: str, set_id: str, source_id: str, contexts: list[dict], created: str) -> dict:
    rec = d.recorder
    edges = bin_edges()
    heights = rec.hist[i].tolist()
    feature = {"modelId": model_id, "layer": source_id, "index": str(i), "creatorId": CREATOR_ID, "createdAt": created,
               "maxActApprox": max((c["maxValue"] for c in contexts), default=0.0), "hasVector": False, "vector": [],
               "vectorLabel": None, "vectorDefaultSteerStrength": 10, "hookName": None,
               "topkCosSimIndices": [], "topkCosSimValues": [],
               "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
               "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
               "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
               "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [], "frac_nonzero": float(rec.density()[i]),
               "freq_hist_data_bar_heights": [h for h in heights if h],
               "freq_hist_data_bar_values": [math.sqrt(a * b) for a, b, h in zip(edges, edges[1:], heights) if h],
               "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": [],
               "sourceSetName": set_id}
    if d.logits is not None:
        pos_ids, pos_values, neg_ids, neg_values = (t[i] for t in d.logits)
        feature.update(pos_str=[decode(int(t)) for t in pos_ids], pos_values=[float(v) for v in pos_values],
                       neg_str=[decode(int(t)) for t in neg_ids], neg_values=[float(v) for v in neg_values])
    return feature
