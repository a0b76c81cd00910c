"""A finished sweep as a Hugging Face model repository, and its upload.

    push_run("runs/demo", "USER/NAME")      # python evaluate.py --run_dir runs/demo --push USER/NAME
                                            # python train_sweep.py … --hf_repo_id USER/NAME

The repository holds one folder per member at its top level (`<member>/cfg.json`,
`sae_weights.safetensors`, `sparsity.safetensors`, as exported), so that SAELens loads a member
with `SAE.from_pretrained(release="USER/NAME", sae_id="<member>")`: a release missing from its
pretrained_saes.yaml is taken as a repository id and sae_id as the folder (sae_lens.loading:
`get_repo_id_and_folder_name`, `sae_lens_huggingface_loader`); no file at the top level is read.
Beside them: `transcoder_sets/` when the run has circuit-tracer sets, sweep.json, sweep.csv,
report.md (its member links pointing at the folders), the plots, and a model card (README.md: YAML
front matter with `library_name: saelens` and tags, the members' table, the FVU-against-L0 plot and
a loading snippet).

The upload is one commit of `CommitOperationAdd`s through huggingface_hub's `HfApi`
(`create_repo`, then `create_commit`). The tests check the operations and load them from an offline
Hugging Face cache; the live upload is untested (no hub is reachable from them). A missing token or
a failed request is a PushError with a one-line message; nothing local is changed.
"""
from __future__ import annotations

import json
from pathlib import Path

from evaluation.report import markdown_table

SUMMARIES = ("sweep.json", "sweep.csv")


class PushError(Exception):
    """The upload did not happen (no token, the Hub unreachable or refusing): one line."""


def hub_operations(run_dir: str | Path, repo_id: str) -> list:
    """The repository's files as huggingface_hub CommitOperationAdds: every member's folder,
    transcoder sets, the summary files, the plots and the model card."""
    from huggingface_hub import CommitOperationAdd

    run = Path(run_dir)
    summary = json.loads((run / "sweep.json").read_text())
    files = {f"{row['name']}/{f.relative_to(run / row['dir']).as_posix()}": f
             for row in summary["members"] for f in sorted((run / row["dir"]).rglob("*")) if f.is_file()}
    files |= {f.relative_to(run).as_posix(): f for f in sorted((run / "transcoder_sets").rglob("*")) if f.is_file()}
    files |= {name: run / name for name in SUMMARIES if (run / name).is_file()}
    plots = sorted(p.name for p in run.glob("*.png"))
    files |= {name: run / name for name in plots}
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    if (run / "report.md").is_file():  # its links point at members/<name>; here the folder is <name>
        report = (run / "report.md").read_text().replace("](members/", "](")
        operations.append(CommitOperationAdd(path_in_repo="report.md", path_or_fileobj=report.encode()))
    saelens = [row["name"] for row in summary["members"] if (run / row["dir"] / "cfg.json").is_file()]
    card = model_card(summary, repo_id, plots, saelens)
    return operations + [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]


def model_card(summary: dict, repo_id: str, plots: list[str], saelens: list[str]) -> str:
    """README.md of the repository: front matter, what was trained on, the table, a plot, how to load.
    `saelens`: the members SAELens loads (the others are crosscoders)."""
    rows, store = summary["members"], summary["store"]
    archs = sorted({r.get("arch", "relu") for r in rows})
    front = ["---", "library_name: saelens", "tags:", "- sae-sweep", "- saelens", "- sparse-autoencoder",
             *(f"- {a}" for a in archs), "---"]
    lines = [*front, "", f"# {repo_id.split('/')[-1]}", "",
             f"{len(rows)} sparse dictionaries ({', '.join(archs)}) trained together with sae-sweep on `{store['hook']}` "
             f"of `{store.get('model')}`, {rows[0].get('train_tokens', '?')} training tokens each; one folder per member. "
             "sweep.json holds every member's configuration and metrics, report.md the full report.", "",
             *markdown_table(rows), ""]
    lines += [f"![{p[:-4]}]({p})" for p in plots if p.endswith("l0_vs_fvu.png")]
    if saelens:
        lines += ["", "Load a member with SAELens:", "", "```python", "from sae_lens import SAE", "",
                  f'sae = SAE.from_pretrained(release="{repo_id}", sae_id="{saelens[0]}")', "```"]
    else:
        lines += ["", "Members are sae-sweep crosscoders: download a folder with huggingface_hub's `snapshot_download("
                      f'"{repo_id}", allow_patterns="<member>/*")` and read it with `formats.crosscoder.load_crosscoder`.']
    return "\n".join(lines) + "\n"


def push_run(run_dir: str | Path, repo_id: str) -> str:
    """Upload the run to the Hub repository `repo_id` (created if missing) in one commit; return its URL."""
    from huggingface_hub import HfApi, get_token

    if get_token() is None:
        raise PushError(f"no Hugging Face token to upload to {repo_id}: set HF_TOKEN or run `hf auth login`, then "
                        f"python evaluate.py --run_dir {run_dir} --push {repo_id}")
    operations = hub_operations(run_dir, repo_id)
    api = HfApi()
    try:  # any failure of the requests (network, refusal, offline mode) is the upload's, reported in one line
        api.create_repo(repo_id, exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=f"sae-sweep: {Path(run_dir).name}")
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise PushError(f"uploading {run_dir} to {repo_id} failed ({type(err).__name__}: {first}); the run is unchanged: "
                        f"retry with python evaluate.py --run_dir {run_dir} --push {repo_id}") from None
    return commit.commit_url


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is USER/NAME as the Hub accepts it; else a ValueError saying so."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{repo_id!r} is not a Hugging Face repository id: {str(err).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise ValueError(f"{repo_id!r} is not a Hugging Face repository id: write USER/NAME")
    return repo_id
