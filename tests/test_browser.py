"""The feature browser: its statistics against brute force over the store's rows, its memory
against the rows it reads, its logit effects against W_dec · W_U, and its pages in a real browser
(Debian's chromium driven by playwright)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import evaluate
import train_sweep
from evaluation.browser import BrowserConfig, build_browser, collect
from evaluation.browser.collect import HALF, LatentRecorder
from tests.conftest import RMS_NAME, TINY_NAME

SOURCE = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def run(small_store, tmp_path_factory) -> Path:
    """A finished sweep of a ReLU and a TopK SAE, evaluated."""
    out = tmp_path_factory.mktemp("browser") / "run"
    args = ["--cache", str(small_store), "--source", SOURCE, "--output_dir", str(out), "--arch", "relu", "topk",
            "--sweep", "relu:l1=3e-3", "topk:k=4", "--ratio", "2", "--batch_size", "64", "--lr", "1e-2", "--n_epochs", "2",
            "--eval_tokens", "400", "--eval_sequences", "2"]
    result = CliRunner().invoke(train_sweep.main, args)
    assert result.exit_code == 0, result.output
    return out


RESULTS = ("sweep.json", "sweep.csv", "report.md")


def test_browser_on_an_evaluated_run_leaves_its_results_as_they_are(run):
    """--browser builds the browser only: sweep.json, report.md and the plots stay byte for byte,
    whatever evaluation options come with it."""
    before = {p.name: p.read_bytes() for p in [*(run / n for n in RESULTS), *run.glob("*.png")]}
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(run), "--n_sequences", "1", "--browser"])
    assert result.exit_code == 0, result.output
    assert {name: (run / name).read_bytes() for name in before} == before
    assert "report.md, sweep.json unchanged" in result.output and (run / "browser" / "index.html").is_file()


def test_evaluating_again_says_what_changed_and_keeps_the_previous_report(run, tmp_path):
    again = tmp_path / "run"
    shutil.copytree(run, again)
    before = {name: (again / name).read_bytes() for name in RESULTS}
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(again), "--n_sequences", "1", "--browser", "--reevaluate"])
    assert result.exit_code == 0, result.output
    member = json.loads(before["sweep.json"])["members"][0]
    changed = [line.split() for line in result.output.splitlines() if "→" in line]
    assert [member["name"], "ce_spliced", f"{member['ce_spliced']:.6g}", "→"] in [line[:4] for line in changed]
    assert all((again / name.replace(".", ".previous.")).read_bytes() == data for name, data in before.items())
    assert (again / "sweep.json").read_bytes() != before["sweep.json"]


def _held_out(run: Path):
    """The held-out rows (raw), their sequence and stored position, straight from the store."""
    from evaluation.runner import open_run_store

    summary = json.loads((run / "sweep.json").read_text())
    store = open_run_store(summary, run)
    start = summary["store"]["eval_sequence_start"]
    seq = torch.from_numpy(store.read_column("sequence", 0)).long()
    keep = seq >= start
    rows = store.read_rows(SOURCE, 0, store.n_rows)[keep].float()
    pos = torch.from_numpy(store.read_column("positions", 0)).long()[keep] - (1 if store.info["exclude_bos"] else 0)
    return summary, store, rows, seq[keep], pos


def test_top_contexts_equal_a_brute_force_sort(run):
    from formats.saelens import load_saelens, saelens_forward
    from evaluation.runner import _load

    summary, store, rows, seq, pos = _held_out(run)
    members = [_load(run / r["dir"], r, summary, "cpu") for r in summary["members"]]
    recorders, n_rows = collect(BrowserConfig(run_dir=str(run), sequences_per_batch=3), store, summary, members)
    assert n_rows == len(rows)
    for r in summary["members"]:  # a ReLU member and a TopK member
        f = saelens_forward(*load_saelens(run / r["dir"]), rows)[0]  # [N, F]
        rec = recorders[r["name"]]
        for latent in range(0, f.shape[1], 7):
            best = {}  # per sequence: its first maximum
            for value, s, p in sorted(zip(f[:, latent].tolist(), seq.tolist(), pos.tolist()), key=lambda t: (t[1], t[2])):
                if value > 0 and (s not in best or value > best[s][0]):
                    best[s] = (value, s, p)
            expected = sorted(best.values(), key=lambda t: (-t[0], t[1]))[: rec.top_k]  # ties: the earlier sequence
            got = [(float(rec.top.value[latent, j]), int(rec.top.where[latent, j, 0]), int(rec.top.where[latent, j, 1]))
                   for j in range(rec.top_k) if math.isfinite(float(rec.top.value[latent, j]))]
            assert [(s, p) for _, s, p in got] == [(s, p) for _, s, p in expected], (r["name"], latent)
            torch.testing.assert_close(torch.tensor([v for v, _, _ in got]), torch.tensor([v for v, _, _ in expected]))
            if got:  # the context: the latent's activation at the example's token, and the store's token there
                value, s, p = got[0]
                assert float(rec.top.acts[latent, 0, HALF]) == pytest.approx(value, rel=1e-3)
                tokens = store.read_sequences(s, s + 1)[0]
                assert int(rec.top.tokens[latent, 0, HALF]) == int(tokens[p + (1 if store.info["exclude_bos"] else 0)])
        density = (f > 0).double().mean(0)
        torch.testing.assert_close(rec.density(), density)


def _batches(n_batches: int, F: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for b in range(n_batches):
        f = torch.relu(torch.randn(4, 12, F, generator=g)) * torch.linspace(0.5, 3, F)
        yield f, torch.randint(0, 100, (4, 12), generator=g), torch.arange(4) + 4 * b


def test_quantile_samples_fall_in_their_bands_and_memory_does_not_grow_with_rows():
    small, large = LatentRecorder(6), LatentRecorder(6)
    values = []
    for f, tokens, seq in _batches(5):
        small.update(f, tokens, seq)
    for f, tokens, seq in _batches(50):
        large.update(f, tokens, seq)
        values.append(f.reshape(-1, 6))
    assert small.nbytes() == large.nbytes()  # 10× the rows, the same heaps
    every = torch.cat(values)
    for latent, bands in enumerate(large.bands()):
        active = every[:, latent][every[:, latent] > 0]
        assert len(bands) == 5 and bands[-1]["hi"] == pytest.approx(float(active.max()))
        for k, band in enumerate(bands):
            assert band["samples"], (latent, k)  # 32 uniform samples: every fifth of the distribution has some
            for j in band["samples"]:
                assert band["lo"] < float(large.sample.value[latent, j]) <= band["hi"]
            # the band's edges are the distribution's quintiles, to the histogram's resolution (a factor 2)
            exact = float(active.quantile((k + 1) / 5))
            assert exact / 2 <= band["hi"] <= exact * 2


@pytest.mark.parametrize("name", [TINY_NAME, RMS_NAME])  # a LayerNorm GPT-NeoX, an RMSNorm Qwen2
def test_the_unembedding_read_alone_equals_the_loaded_models(name):
    """W_U from the checkpoint's output embedding and final norm alone equals the loaded
    model's processed W_U (norm folded, centred)."""
    from cache.models import load_model
    from cache.unembed import load_unembedding

    unembedding = load_unembedding({"model": name, "model_path": None, "backend": "transformer_lens"}, "float32")
    model = load_model(name, None, device="cpu")
    torch.testing.assert_close(unembedding.W_U, model.W_U, atol=1e-5, rtol=1e-5)
    assert unembedding.centre_input == (model.cfg.normalization_type in ("LN", "LNPre"))


def test_logit_effects_are_the_decoder_through_the_unembedding(run):
    """The logit effects are W_dec · W_U's top and bottom 10."""
    from cache.models import load_model
    from cache.unembed import load_unembedding
    from evaluation.browser.logit_effects import member_logit_effects
    from evaluation.runner import _load, open_run_store

    summary = json.loads((run / "sweep.json").read_text())
    store = open_run_store(summary, run)
    entry = store.info["models"][0]
    unembedding = load_unembedding(entry, "float32")
    model = load_model(entry["model"], entry["model_path"], device="cpu")
    member = _load(run / summary["members"][0]["dir"], summary["members"][0], summary, "cpu")
    pos_ids, pos_values, neg_ids, neg_values = member_logit_effects(member, store, unembedding.W_U, unembedding.centre_input)
    W_dec = member.weights["W_dec"]
    if unembedding.centre_input:
        W_dec = W_dec - W_dec.mean(-1, keepdim=True)
    by_hand = W_dec @ model.W_U  # [F, V]
    torch.testing.assert_close(pos_values, by_hand.topk(10, dim=-1).values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(neg_values, by_hand.topk(10, dim=-1, largest=False).values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(by_hand.gather(1, pos_ids), pos_values, atol=1e-4, rtol=1e-4)


def test_tiled_logit_effects_equal_the_whole_product():
    """Tiles of 3 × 64 logits give the same top and bottom k (values and token ids) as one topk
    over the plain [F, V] product."""
    from evaluation.browser.logit_effects import top_logit_effects

    g = torch.Generator().manual_seed(0)
    W_dec_FD, W_U_DV = torch.randn(50, 16, generator=g), torch.randn(16, 1000, generator=g)
    got = top_logit_effects(W_dec_FD, W_U_DV, k=7, tile_elements=200)
    plain = W_dec_FD @ W_U_DV  # [F, V]
    top, bottom = plain.topk(7, dim=1), plain.topk(7, dim=1, largest=False)
    assert torch.equal(got.pos_ids, top.indices) and torch.equal(got.neg_ids, bottom.indices)
    torch.testing.assert_close(got.pos_values, top.values)
    torch.testing.assert_close(got.neg_values, bottom.values)


def test_logit_effects_never_hold_the_whole_product():
    """At 4,096 latents × 65,536 tokens the plain product is 1 GiB; the tiled one allocates at
    most a few tiles (2^20 logits, 4 MiB, here) beyond its inputs and outputs."""
    from torch.profiler import ProfilerActivity, profile

    from evaluation.browser.logit_effects import top_logit_effects

    F, D, V, tile = 4096, 8, 65536, 2**20
    W_dec_FD, W_U_DV = torch.randn(F, D), torch.randn(D, V)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        top_logit_effects(W_dec_FD, W_U_DV, k=10, tile_elements=tile)
    largest = max(e.cpu_memory_usage for e in prof.events())  # the largest single allocation of any op
    assert largest <= tile * 4, largest
    assert largest < F * V * 4 / 64


def test_contexts_show_line_breaks_as_marks():
    from evaluation.browser.site import visible

    assert visible("a\n\tb\r\n") == "a↵⇥b␍↵"


# Neuronpedia's bulk-import records, field by field: the dataclasses its exporter writes them from
# (hijohnnylin/neuronpedia @ ebb8426fc550ad5d1f76d52c271a624af3c08a57,
# utils/neuronpedia-utils/neuronpedia_utils/db_models/{source_release,model,source_set,source,feature,activation}.py;
# `convert-saedashboard-to-neuronpedia-export.py` writes each record as the dataclass's __dict__).
# No installable package carries them (PyPI's `neuronpedia` client and `sae-dashboard` do not), so
# the names and annotations are copied here; a `!` marks the fields without a default.
NEURONPEDIA_RECORDS = {
    "release.jsonl": "!name:str !description:str !creatorName:str !creatorId:str visibility:str isNewUi:bool "
                     "featured:bool descriptionShort:Optional[str] urls:List[str] creatorEmail:Optional[str] "
                     "creatorNameShort:Optional[str] defaultSourceSetName:Optional[str] defaultSourceId:Optional[str] "
                     "defaultUmapSourceIds:List[str] createdAt:datetime",
    "model.jsonl": "!id:str !instruct:bool !creatorId:str displayNameShort:str displayName:str tlensId:Optional[str] "
                   "dimension:Optional[int] visibility:str defaultSourceSetName:Optional[str] defaultSourceId:Optional[str] "
                   "inferenceEnabled:bool layers:int neuronsPerLayer:int createdAt:datetime owner:str updatedAt:datetime "
                   "website:Optional[str]",
    "sourceset.jsonl": "!modelId:str !name:str !creatorId:str hasDashboards:bool visibility:str description:str type:str "
                       "creatorName:str urls:List[str] creatorEmail:Optional[str] releaseName:Optional[str] "
                       "defaultOfModelId:Optional[str] defaultRange:int defaultShowBreaks:bool showDfa:bool "
                       "showCorrelated:bool showHeadAttribution:bool showUmap:bool createdAt:datetime",
    "source.jsonl": "!id:str !modelId:str !setName:str !creatorId:str hasDashboards:bool inferenceEnabled:bool "
                    "inferenceHosts:List[str] saelensConfig:Optional[str] saelensRelease:Optional[str] "
                    "saelensSaeId:Optional[str] hfRepoId:Optional[str] hfFolderId:Optional[str] visibility:str "
                    "defaultOfModelId:Optional[str] hasUmap:bool hasUmapLogSparsity:bool hasUmapClusters:bool "
                    "num_prompts:Optional[int] num_tokens_in_prompt:Optional[int] dataset:Optional[str] "
                    "notes:Optional[str] createdAt:datetime",
    "features": "!modelId:str !layer:str !index:str creatorId:Optional[str] createdAt:datetime maxActApprox:Optional[float] "
                "hasVector:bool vector:List[float] vectorLabel:Optional[str] vectorDefaultSteerStrength:Optional[float] "
                "hookName:Optional[str] topkCosSimIndices:List[int] topkCosSimValues:List[float] "
                "neuron_alignment_indices:List[int] neuron_alignment_values:List[float] neuron_alignment_l1:List[float] "
                "correlated_neurons_indices:List[int] correlated_neurons_pearson:List[float] "
                "correlated_neurons_l1:List[float] correlated_features_indices:List[int] "
                "correlated_features_pearson:List[float] correlated_features_l1:List[float] neg_str:List[str] "
                "neg_values:List[float] pos_str:List[str] pos_values:List[float] frac_nonzero:float "
                "freq_hist_data_bar_heights:List[float] freq_hist_data_bar_values:List[float] "
                "logits_hist_data_bar_heights:List[float] logits_hist_data_bar_values:List[float] "
                "decoder_weights_dist:List[float] sourceSetName:Optional[str]",
    "activations": "!id:str !tokens:List[str] !index:str !layer:str !modelId:str !maxValue:float !maxValueTokenIndex:int "
                   "!minValue:float !values:List[float] !creatorId:str dataSource:Optional[str] dataIndex:Optional[str] "
                   "dfaValues:List[float] dfaTargetIndex:Optional[int] dfaMaxValue:Optional[float] createdAt:datetime "
                   "lossValues:List[float] logitContributions:Optional[str] binMin:Optional[float] "
                   "binMax:Optional[float] binContains:Optional[float] qualifyingTokenIndex:Optional[int] "
                   "zIndices:Optional[List[List[int]]] zValues:Optional[List[float]]",
}


def _conforms(value, annotation: str) -> bool:
    """Whether a JSON value fits a db_models annotation (datetimes as ISO strings, as orjson writes them)."""
    if annotation.startswith("Optional["):
        return value is None or _conforms(value, annotation[9:-1])
    if annotation.startswith("List["):
        return isinstance(value, list) and all(_conforms(v, annotation[5:-1]) for v in value)
    if annotation == "datetime":
        from datetime import datetime

        return isinstance(value, str) and datetime.fromisoformat(value) is not None
    kinds = {"str": str, "bool": bool, "int": int, "float": (int, float)}
    return isinstance(value, kinds[annotation]) and (annotation == "bool" or not isinstance(value, bool))


def _check_record(record: dict, fields: str) -> None:
    spec = {f.split(":")[0].lstrip("!"): f.split(":", 1)[1] for f in fields.split()}
    assert set(record) == set(spec), set(record) ^ set(spec)
    for name, annotation in spec.items():
        assert _conforms(record[name], annotation), (name, record[name])
    for f in fields.split():
        if f.startswith("!"):
            assert record[f[1:].split(":")[0]] is not None


def _jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, gzip-compressed when its name ends in .gz."""
    import gzip

    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_neuronpedia_export_has_the_fields_of_its_exporter(run):
    target = build_browser(BrowserConfig(run_dir=str(run), format="neuronpedia", shard_latents=16, hf_repo_id="u/sweep"))
    members = json.loads((run / "sweep.json").read_text())["members"]
    (model_dir,) = target.iterdir()
    sources = sorted(p.name for p in model_dir.iterdir())
    assert sources == sorted(f"1-run__{m['name'].replace('.', '-')}" for m in members)  # {layer}-{set}__{member}
    for member, source in zip(members, sources):
        directory = model_dir / source
        for name in ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl"):
            (record,) = _jsonl(directory / name)
            _check_record(record, NEURONPEDIA_RECORDS[name])
        (source_record,) = _jsonl(directory / "source.jsonl")
        assert source_record["id"] == source and source_record["hfFolderId"] == member["name"]
        batches = sorted((directory / "features").iterdir())
        assert [p.name for p in batches] == [f"batch-{b}.jsonl.gz" for b in range(len(batches))]
        features = [f for p in batches for f in _jsonl(p)]
        activations = [a for p in sorted((directory / "activations").iterdir()) for a in _jsonl(p)]
        assert [f["index"] for f in features] == [str(i) for i in range(member["d_sae"])]
        for record in features:
            _check_record(record, NEURONPEDIA_RECORDS["features"])
            assert record["layer"] == source and record["modelId"] == model_dir.name
        for record in activations:
            _check_record(record, NEURONPEDIA_RECORDS["activations"])
            values = record["values"]  # what the exporter derives from the values
            assert (record["maxValue"], record["minValue"]) == (max(values), min(values))
            assert record["maxValueTokenIndex"] == values.index(max(values)) and len(values) == len(record["tokens"])
            assert values[record["qualifyingTokenIndex"]] > 0
        by_latent = {}
        for record in activations:
            by_latent.setdefault(record["index"], []).append(record["maxValue"])
        for record in features:  # maxActApprox: the largest maxValue of its activations, as the exporter sets it
            assert record["maxActApprox"] == max(by_latent.get(record["index"], [0.0]))
        assert len({a["id"] for a in activations}) == len(activations)
        assert any(f["pos_str"] for f in features) and 0 < max(f["frac_nonzero"] for f in features) <= 1


def test_the_browser_in_a_real_browser(run, tmp_path):
    """From file://: the index, a member, its table sorted by density, a latent's card; the peak
    token of its first context and its activation equal what SAELens's own loader computes."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extra)")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed here (.ci/run installs it)")
    from sae_lens import SAE

    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(run), "--n_sequences", "0", "--browser"])
    assert result.exit_code == 0, result.output
    site = run / "browser"
    summary, store, rows, seq, pos = _held_out(run)
    member = summary["members"][1]  # the TopK SAE
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-background-networking", "--no-first-run"])
        page = browser.new_page()
        page.goto((site / "index.html").as_uri())
        page.click(f"text={member['name']}")
        page.wait_for_selector("#latents tr.latent")
        page.click("#latents th[data-k=density]")  # sort by density, highest first
        first = page.locator("#latents tr.latent").first
        latent = int(first.get_attribute("data-i"))
        first.click()
        page.wait_for_selector("#latent-card #top .ctx")
        peak = page.locator("#top .ctx").first.locator(".tok.peak")
        shown_token, shown_value = peak.inner_text(), float(peak.get_attribute("data-act"))
        page.screenshot(path=str(tmp_path / "latent-card.png"), full_page=True)
        shutil.copy(tmp_path / "latent-card.png", run / "latent-card.png")  # kept beside the run as an artefact
        densities = [float(t) for t in page.locator("#latents tr.latent td:nth-child(2)").all_inner_texts()[:5]]
        first_context = page.locator("#top .ctx").first
        score_first = first_context.evaluate("e => e.firstElementChild.className")
        subtitle, unit = page.inner_text("#subtitle"), page.inner_text("#logit-unit")
        link = page.locator(f"#latents tr.latent[data-i='{latent}'] a").get_attribute("href")
        shared = browser.new_page()  # the latent's own address, as a new tab opens it
        shared.goto((site / "member.html").as_uri() + link.removeprefix("member.html"))
        shared.wait_for_selector(f"#latent-card[data-latent='{latent}'] #top .ctx")
        shared_peak = shared.locator("#top .ctx").first.locator(".tok.peak").get_attribute("data-act")
        shared.goto((site / "index.html").as_uri())
        dead = shared.locator("#members tr").nth(2).locator("td").last.inner_text()  # the TopK member's row
        browser.close()
    assert densities == sorted(densities, reverse=True)
    assert link == f"member.html?m={member['name']}#latent={latent}" and float(shared_peak) == shown_value
    assert score_first == "score" and "logit change per unit activation" in unit
    assert subtitle.startswith(f"{member['d_sae']:,} latents; ") and "% dead" in subtitle and not subtitle.endswith(";")
    assert dead == f"{100 * member['dead_fraction']:.1f}%"
    sae = SAE.load_from_disk(run / member["dir"])
    with torch.no_grad():
        f = sae.encode(rows)[:, latent]
    best = int(f.argmax())
    assert shown_value == pytest.approx(float(f[best]), rel=2e-3)
    tokens = store.read_sequences(int(seq[best]), int(seq[best]) + 1)[0]
    token = int(tokens[int(pos[best]) + (1 if store.info["exclude_bos"] else 0)])
    from cache.models import load_model

    assert shown_token == load_model(TINY_NAME, None, device="cpu").tokenizer.decode([token])
