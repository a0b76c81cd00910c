"""Sharing a sweep on the Hugging Face Hub: the upload's commit operations, captured from
huggingface_hub's own HfApi, laid into an offline Hugging Face cache exactly as a download leaves
them (blobs, snapshot symlinks, refs/main), load member by member through SAELens's own
`SAE.from_pretrained(release="USER/NAME", sae_id=<member>)` and give our exports' outputs; a
missing token or a failed request is one line and leaves the run as it is. No hub is reachable
here: the live upload is untested."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import evaluate
import train_sweep

SOURCE = "blocks.1.hook_resid_post"
REPO = "test-user/tiny-sweep"
REVISION = "4f1c0e9d2b7a6c5d8e3f1a0b9c8d7e6f5a4b3c2d"


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory):
    """A ReLU and a TopK SAE trained with --hf_repo_id and no token: (the run directory, the CLI result)."""
    out = tmp_path_factory.mktemp("share") / "run"
    args = ["--cache", str(small_store), "--source", SOURCE, "--output_dir", str(out), "--arch", "relu", "topk",
            "--sweep", "relu:l1=3e-3", "topk:k=4", "--ratio", "2", "--batch_size", "64", "--lr", "1e-2", "--n_epochs", "1",
            "--eval_tokens", "400", "--eval_sequences", "0", "--hf_repo_id", REPO]
    with pytest.MonkeyPatch.context() as m:
        m.delenv("HF_TOKEN", raising=False)
        result = CliRunner().invoke(train_sweep.main, args)
    return out, result


def test_train_sweep_without_a_token_keeps_the_run_and_says_so_in_one_line(trained):
    out, result = trained
    assert result.exit_code == 1, result.output
    assert len(_errors(result.output)) == 1 and "no Hugging Face token" in _errors(result.output)[0]
    summary = json.loads((out / "sweep.json").read_text())
    assert (out / "report.md").is_file() and all((out / r["dir"] / "sae_weights.safetensors").is_file()
                                                 for r in summary["members"])


def _push(run: Path, monkeypatch) -> list:
    """evaluate.py --push with HfApi's requests replaced by a recorder: the commit's operations."""
    from huggingface_hub import HfApi

    captured = {}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: captured.setdefault("created", (repo_id, kw)))

    def create_commit(self, repo_id, operations, **kw):
        captured["operations"] = list(operations)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/{REVISION}")

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(run), "--n_sequences", "0", "--push", REPO])
    assert result.exit_code == 0, result.output
    assert captured["created"] == (REPO, {"exist_ok": True}) and f"pushed to https://huggingface.co/{REPO}" in result.output
    return captured["operations"]


def _lay_into_cache(operations: list, repo_id: str) -> None:
    """The files as hf_hub_download leaves them: blobs by content hash, snapshot symlinks, refs/main."""
    repo = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo_id.replace('/', '--')}"
    for op in operations:
        with op.as_file() as f:
            data = f.read()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / REVISION / op.path_in_repo
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)


def test_the_pushed_repository_loads_every_member_through_saelens_from_pretrained(trained, monkeypatch):
    from huggingface_hub import CommitOperationAdd, ModelCard
    from sae_lens import SAE

    run, _ = trained
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set with HF_HOME before huggingface_hub was imported (conftest)
    operations = _push(run, monkeypatch)
    assert all(isinstance(op, CommitOperationAdd) for op in operations)
    paths = {op.path_in_repo for op in operations}
    members = [r["name"] for r in json.loads((run / "sweep.json").read_text())["members"]]
    assert paths == {f"{m}/{f}" for m in members for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")} | {
        "sweep.json", "sweep.csv", "report.md", "README.md", *(p.name for p in run.glob("*.png"))}
    card = next(op for op in operations if op.path_in_repo == "README.md").path_or_fileobj.decode()
    data = ModelCard(card).data
    assert data.library_name == "saelens" and "saelens" in data.tags and "![l0_vs_fvu](l0_vs_fvu.png)" in card
    assert f'SAE.from_pretrained(release="{REPO}", sae_id="{members[0]}")' in card and all(f"| {m} |" in card for m in members)

    _lay_into_cache(operations, REPO)
    x = torch.randn(64, json.loads((run / "members" / members[0] / "cfg.json").read_text())["d_in"],
                    generator=torch.Generator().manual_seed(0)) * 3
    for name in members:
        hub_sae = SAE.from_pretrained(release=REPO, sae_id=name)
        ours = SAE.load_from_disk(run / "members" / name)
        with torch.no_grad():
            assert torch.equal(hub_sae.encode(x), ours.encode(x)) and torch.equal(hub_sae(x), ours(x)), name
        _, _, log_sparsity = SAE.from_pretrained_with_cfg_and_sparsity(release=REPO, sae_id=name)
        assert torch.equal(log_sparsity, load_file(run / "members" / name / "sparsity.safetensors")["sparsity"])


def test_push_without_a_token_is_one_line_and_exit_code_1(trained, monkeypatch):
    from huggingface_hub import HfApi

    run, _ = trained
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("no request without a token"))
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(run), "--n_sequences", "0", "--push", REPO])
    assert result.exit_code == 1 and len(_errors(result.output)) == 1, result.output
    assert "no Hugging Face token" in result.output and "HF_TOKEN" in result.output


def test_a_failed_request_is_one_line_and_the_run_stays(trained, monkeypatch):
    """huggingface_hub's own failure (offline mode refuses the request) is reported in one line."""
    run, _ = trained
    before = {p: p.read_bytes() for p in (run / "members").rglob("*") if p.is_file()}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(run), "--n_sequences", "0", "--push", REPO])
    assert result.exit_code == 1 and len(_errors(result.output)) == 1, result.output
    assert "OfflineModeIsEnabled" in _errors(result.output)[0] and "Traceback" not in result.output
    assert {p: p.read_bytes() for p in (run / "members").rglob("*") if p.is_file()} == before


def test_a_malformed_repository_id_is_refused_before_anything_runs(tmp_path):
    result = CliRunner().invoke(evaluate.main, ["--run_dir", str(tmp_path), "--push", "no slash here"])
    assert result.exit_code == 2 and "repository id" in result.output
