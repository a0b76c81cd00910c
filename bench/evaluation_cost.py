"""What a sweep's evaluation costs against its training, before and after the spliced CE/KL was
rebuilt (prefix sharing, stacked splices, the unembedding in tiles with an online softmax), on a real run.

    python generate_activations.py --n_tokens 50_000 --out caches/demo        # the README demo
    python train_sweep.py --cache caches/demo --output_dir runs/demo --ratio 4 --n_models 6 --batch_size 1024 \
        --n_epochs 3 --eval_tokens 5000 --eval_sequences 8
    python -m bench.evaluation_cost --run_dir runs/demo
    python -m bench.evaluation_cost --vocab_sizes 16384,65536,262144    # the spliced phase against the vocabulary

Each variant evaluates a copy of the run in a fresh process (`evaluate_run`, as `evaluate.py`
does): the whole evaluation's seconds, the spliced phase's seconds alone, and the process's peak
RSS (os.wait4's ru_maxrss). "before" replaces the splice by the straightforward computation the
tests check the new one against (tests/test_splice.py: a whole forward per splice and [b, T, V]
log-probabilities); its CE of every member is compared with the new path's. Variants with fewer
members evaluate the first members of sweep.json only.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import click

from bench._common import format_table, run_measured

ROOT = Path(__file__).resolve().parent.parent

_CHILD = '''
import json, sys, time
sys.path.insert(0, {root!r})
import evaluation.runner as runner
from evaluation.config import EvalConfig
from evaluation.runner import evaluate_run

spent = [0.0]
new_path = runner.spliced_losses

def timed(model, sequences, splices, *, first_pos=0, exclude_tokens=(), batch_size=8, desc=None):
    start = time.perf_counter()
    if {before!r}:
        from tests.test_splice import straightforward
        out = straightforward(model, sequences, splices, first_pos, tuple(exclude_tokens), batch_size)
    else:
        out = new_path(model, sequences, splices, first_pos=first_pos, exclude_tokens=exclude_tokens,
                       batch_size=batch_size, desc=desc)
    spent[0] += time.perf_counter() - start
    return out

runner.spliced_losses = timed
start = time.perf_counter()
rows = evaluate_run(EvalConfig(run_dir={run!r}, n_sequences={sequences!r}, batch_size=8))
print(json.dumps({{"total": time.perf_counter() - start, "splice": spent[0],
                   "ce": {{r["name"]: r.get("ce_spliced") for r in rows}}}}))
'''


_VOCAB_CHILD = '''
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from evaluation.splice import single, spliced_losses

torch.manual_seed(0)
model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=640, d_head=64, n_heads=10, d_mlp=2048, n_ctx=128,
                                                  d_vocab={vocab}, act_fn="gelu", normalization_type="LN")).eval()
sequences = torch.randint(0, {vocab}, ({sequences}, 128), generator=torch.Generator().manual_seed(1))
splices = {{f"m{{i}}": single("blocks.1.hook_resid_pre", lambda x, _, s=1 - 0.05 * i: x * s) for i in range({members})}}
spliced_losses(model, sequences[:1, :8], splices)  # warm-up
start = time.perf_counter()
spliced_losses(model, sequences, splices, batch_size=8)
print(json.dumps({{"seconds": time.perf_counter() - start}}))
'''


def vocabulary_scaling(vocab_sizes: list[int], members: int, sequences: int) -> None:
    """The spliced phase alone on a random 2-layer model of the demo's width (d 640) at each
    vocabulary size, `members` splices (no ablation baselines) over `sequences` × 128 tokens,
    each size in a fresh process: seconds and peak RSS."""
    rows, first = [], None
    for vocab in vocab_sizes:
        code = _VOCAB_CHILD.format(root=str(ROOT), vocab=vocab, members=members, sequences=sequences)
        out, _, peak = run_measured([sys.executable, "-c", code], cwd=ROOT)
        seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
        first = first or (vocab, seconds)
        rows.append([f"{vocab:,}", f"{seconds:.1f}", f"{seconds / first[1]:.2f}", f"{vocab / first[0]:.1f}", f"{peak / 2**30:.2f}"])
    print(format_table(["vocabulary", "spliced s", "× smallest", "vocabulary ×", "peak RSS GiB"], rows))


def evaluate_copy(run: Path, tmp: Path, members: int, sequences: int, before: bool) -> tuple[dict, int]:
    """Evaluate a copy of `run` holding its first `members` members; (the child's report, peak RSS bytes)."""
    copy = tmp / f"run_{members}_{sequences}_{before}"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoint*", "browser"))
    summary = json.loads((copy / "sweep.json").read_text())
    summary["members"] = summary["members"][:members]
    (copy / "sweep.json").write_text(json.dumps(summary))
    code = _CHILD.format(root=str(ROOT), run=str(copy), sequences=sequences, before=before)
    out, _, peak = run_measured([sys.executable, "-c", code], cwd=ROOT)
    report = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(copy)
    return report, peak


@click.command()
@click.option("--run_dir", help="A finished sweep (the README demo's runs/demo).")
@click.option("--sequences", default="8,32", show_default=True, help="Held-out sequences of the variants.")
@click.option("--vocab_sizes", default=None, help="Instead: the spliced phase on a random d-640 model at these "
              "vocabulary sizes, e.g. 16384,65536,262144 (6 splices, 8 × 128 tokens).")
def main(run_dir: str | None, sequences: str, vocab_sizes: str | None) -> None:
    if vocab_sizes:
        vocabulary_scaling([int(v) for v in vocab_sizes.split(",")], members=6, sequences=8)
        return
    if run_dir is None:
        raise click.UsageError("give --run_dir (or --vocab_sizes)")
    run = Path(run_dir)
    summary = json.loads((run / "sweep.json").read_text())
    n_members, train_s = len(summary["members"]), float(summary["train_seconds"])
    counts = [int(s) for s in sequences.split(",")]
    variants = [(True, n_members, counts[0]), (False, n_members, counts[0]), (False, max(1, n_members // 2), counts[0]),
                *[(False, n_members, s) for s in counts[1:]]]
    rows, ce = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for before, members, seqs in variants:
            report, peak = evaluate_copy(run, Path(tmp), members, seqs, before)
            ce[before, members, seqs] = report["ce"]
            rows.append(["before" if before else "after", str(members), str(seqs), f"{report['total']:.0f}",
                         f"{report['splice']:.1f}", f"{report['total'] / train_s:.2f}", f"{peak / 2**30:.2f}"])
    print(format_table(["splice", "members", "sequences", "evaluation s", "spliced phase s", "÷ training",
                        "peak RSS GiB"], rows))
    print(f"training: {train_s:.0f} s ({n_members} members)")
    old, new = ce[True, n_members, counts[0]], ce[False, n_members, counts[0]]
    worst = max(abs(old[k] - new[k]) / abs(old[k]) for k in old)
    print(f"CE spliced, after vs before: largest relative difference {worst:.1e} over {len(old)} members")


if __name__ == "__main__":
    main()
