"""The browser's statistics as the batch files Neuronpedia's upload path reads (the layout SAE
Dashboard's Neuronpedia runner writes: `<member>/batch-N.json`, one per block of latents, and
`run_settings.json`), so a sweep can be published without re-running anything.

Fields filled, per feature: feature_index; pos_str / pos_values and neg_str / neg_values (the
top and bottom 10 logit effects, when the model could be loaded); frac_nonzero (density);
freq_hist_data_bar_values / _heights (the activation histogram: bin centres, counts);
activations (the top contexts with bin_min −1, then the quantile bands' samples with their
range and bin_contains = the band's share; tokens as strings, values per token,
qualifying_token_index the example's token); n_prompts_total (sequences seen),
n_tokens_in_prompt (the context's length); dataset. Left empty (not computed here): the neuron
alignment and correlated neuron / feature lists, the logits histogram, the decoder weight
distribution and the vector (the member's weights are in its own directory).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from evaluation.browser.collect import HALF, bin_edges


def write_neuronpedia(target: Path, data: list, store, decode, shard: int) -> None:
    info = store.info
    edges = bin_edges()
    centres = [math.sqrt(a * b) for a, b in zip(edges, edges[1:])]
    for d in data:
        directory = target / d.row["name"]
        directory.mkdir(parents=True, exist_ok=True)
        rec = d.recorder
        hook = d.row.get("hook_name") or store.source((d.row.get("inputs") or [store.sources[0].name])[0]).hook
        layer = store.source((d.row.get("inputs") or [store.sources[0].name])[0]).layer
        bands = rec.bands()
        n_sequences = rec.n_tokens // max(1, info["context_length"] - (1 if info["exclude_bos"] else 0))
        for b, first in enumerate(range(0, rec.F, shard)):
            features = [_feature(d, i, bands[i], decode, centres, n_sequences, info) for i in range(first, min(first + shard, rec.F))]
            batch = {"model_id": info.get("model_name"), "layer": layer, "sae_set": d.row["name"], "sae_id_suffix": None,
                     "features": features}
            (directory / f"batch-{b}.json").write_text(json.dumps(batch))
        (directory / "run_settings.json").write_text(json.dumps(
            {"model_id": info.get("model_name"), "hook_name": hook, "layer": layer, "sae_set": d.row["name"],
             "dataset": info.get("dataset"), "n_features": rec.F, "features_per_batch": shard, "context_tokens": 2 * HALF + 1,
             "source": "sae-sweep browser pass over the store's rows"}, indent=2))


def _feature(d, i: int, bands: list[dict], decode, centres: list[float], n_sequences: int, info: dict) -> dict:
    rec = d.recorder

    def activation(slot, j, lo, hi, share) -> dict:
        tokens = slot.tokens[i, j].tolist()
        kept = [k for k, t in enumerate(tokens) if t >= 0]
        return {"bin_min": lo, "bin_max": hi, "bin_contains": share, "tokens": [decode(tokens[k]) for k in kept],
                "values": [round(float(slot.acts[i, j, k]), 3) for k in kept], "qualifying_token_index": kept.index(HALF)}

    top = [activation(rec.top, j, -1, float(rec.max[i]), -1) for j in range(rec.top_k)
           if math.isfinite(float(rec.top.value[i, j]))]
    sampled = [activation(rec.sample, j, b["lo"], b["hi"], b["frac"]) for b in bands for j in b["samples"]]
    heights = rec.hist[i].tolist()
    feature = {"feature_index": i, "frac_nonzero": float(rec.density()[i]),
               "freq_hist_data_bar_values": [c for c, h in zip(centres, heights) if h],
               "freq_hist_data_bar_heights": [h for h in heights if h],
               "logits_hist_data_bar_values": [], "logits_hist_data_bar_heights": [],
               "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
               "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
               "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
               "correlated_features_indices": [], "correlated_features_l1": [], "correlated_features_pearson": [],
               "n_prompts_total": n_sequences, "n_tokens_in_prompt": 2 * HALF + 1, "dataset": info.get("dataset"),
               "activations": top + sampled, "decoder_weights_dist": [], "vector": []}
    if d.logits is not None:
        pos_ids, pos_values, neg_ids, neg_values = (t[i] for t in d.logits)
        feature.update(pos_str=[decode(int(t)) for t in pos_ids], pos_values=[float(v) for v in pos_values],
                       neg_str=[decode(int(t)) for t in neg_ids], neg_values=[float(v) for v in neg_values])
    return feature
