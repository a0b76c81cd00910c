"""Several finished sweeps side by side: one table and one set of frontier plots.

    python evaluate.py --compare runs/relu runs/topk runs/multi --out runs/compared

Reads each run directory's sweep.json (as evaluation left it) and writes into `out`:
compare.csv (every member of every run, with its run and architecture), compare.md (the table
and the plots) and the plots of evaluation/plots.py with one curve per run and architecture:
L0 against FVU, and L0 against CE recovered with zero and with mean ablation (the pareto plots a
sweep's report draws for one run). Runs of different models or hooks measure different things:
they are refused with one line naming the difference, unless `force`. Everything else that makes
figures not like for like (held-out rows, spliced sequences, steps, widths, stores) is stated, on
the terminal and in compare.md, and the affected columns are marked †.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from evaluation.plots import plot_sweep
from evaluation.report import TABLE, _cell


class CompareError(ValueError):
    """Runs that cannot be compared (or are not finished)."""


def load_run(directory: Path) -> dict:
    path = directory / "sweep.json"
    if not path.is_file():
        raise CompareError(f"{directory} holds no finished sweep (no sweep.json): train it first")
    return json.loads(path.read_text())


def what_it_measures(summary: dict) -> dict:
    """The model and hooks a run's members read and write (runs written before sweep.json named
    them: their store's source names)."""
    store = summary["store"]
    return {"model": store.get("model"), "hooks": store.get("hooks") or store.get("sources") or [store.get("source")]}


# What can differ between comparable runs: (label, the table columns whose figures it changes).
_FACETS = {
    "held_out": ("held-out rows", ("l0", "fvu", "dead_fraction")),
    "sequences": ("spliced sequences", ("ce_recovered", "ce_recovered_mean_ablation", "kl")),
    "store": ("store", ()),
    "steps": ("training steps", ()),
    "widths": ("widths (d_sae)", ()),
    "models": ("model", ()),
    "hooks": ("hooks", ()),
}


def facts(summary: dict) -> dict[str, str]:
    """What each facet of _FACETS is for one run, as text."""
    store, members = summary["store"], summary["members"]
    tokens = sorted({m.get("n_tokens") for m in members if m.get("n_tokens") is not None})
    held = f"{store.get('eval_rows', '?'):,} rows from sequence {store.get('eval_sequence_start', '?')}" \
        if isinstance(store.get("eval_rows"), int) else "?"
    if tokens:
        held += f", {tokens[0]:,} evaluated" if len(tokens) == 1 else f", {tokens[0]:,}–{tokens[-1]:,} evaluated"
    spliced = (summary.get("eval") or {}).get("n_sequences")
    steps = (summary.get("resolved") or {}).get("total_steps")
    measured = what_it_measures(summary)
    return {"held_out": held, "sequences": "none" if spliced is None else str(spliced),
            "store": str(store.get("path")), "steps": "?" if steps is None else f"{steps:,}",
            "widths": ", ".join(str(w) for w in sorted({m["d_sae"] for m in members if "d_sae" in m})),
            "models": str(measured["model"]), "hooks": ", ".join(map(str, measured["hooks"]))}


def differences(names: list[str], summaries: list[dict]) -> list[tuple[str, list[str]]]:
    """The facets on which the runs differ: [(facet, ["run: value", …])]."""
    per_run = [facts(s) for s in summaries]
    return [(facet, [f"{n}: {f[facet]}" for n, f in zip(names, per_run)])
            for facet in _FACETS if len({f[facet] for f in per_run}) > 1]


def compare_runs(run_dirs: list[str], out: str, force: bool = False) -> tuple[list[dict], list[str]]:
    """Combine the runs' members into one table and one set of plots in `out`; → the rows, and one
    line per way in which the runs are not like for like."""
    runs = [(Path(d), load_run(Path(d))) for d in run_dirs]
    if len(runs) < 2:
        raise CompareError("--compare needs at least two run directories")
    reference = what_it_measures(runs[0][1])
    for directory, summary in runs[1:]:
        measured = what_it_measures(summary)
        if measured != reference and not force:
            differs = [k for k in reference if reference[k] != measured[k]]
            raise CompareError(f"{directory} measures other {' and '.join(differs)} than {runs[0][0]} "
                               f"({measured[differs[0]]} vs {reference[differs[0]]}): compare runs of one model and hook, "
                               "or pass --force")
    names = _run_names([d for d, _ in runs])
    rows = [{"run": name, **member} for name, (_, summary) in zip(names, runs) for member in summary["members"]]
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    fields = ["run", *dict.fromkeys(k for r in rows for k in r if k != "run" and not isinstance(r[k], dict))]
    with open(target / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plots = plot_sweep(rows, target, label=lambda r: f"{r['run']}: {r.get('arch', 'relu')}", prefix="compare_")
    differ = differences(names, [summary for _, summary in runs])
    _write_markdown(target / "compare.md", names, [d for d, _ in runs], rows, plots, differ)
    return rows, [f"not like for like: {_FACETS[facet][0]} differ ({'; '.join(values)})" for facet, values in differ]


def _run_names(dirs: list[Path]) -> list[str]:
    """Each run's directory name, made unique with its parent where two share one."""
    names = [d.name for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def _write_markdown(path: Path, names: list[str], dirs: list[Path], rows: list[dict], plots: list[Path],
                    differ: list[tuple[str, list[str]]]) -> None:
    columns = [("run", "run", "{}"), *(c for c in TABLE if any(c[0] in r for r in rows))]
    marked = {key for facet, _ in differ for key in _FACETS[facet][1]}
    lines = ["# Runs compared", "", *(f"- `{n}`: {d}" for n, d in zip(names, dirs)), ""]
    if differ:
        lines += ["## Not like for like", "", "The runs differ in what follows; the columns marked † were measured on "
                  "different rows or sequences, so their figures are not directly comparable.", ""]
        lines += [f"- **{_FACETS[facet][0]}**: " + "; ".join(values) for facet, values in differ] + [""]
    lines += ["| " + " | ".join(h + (" †" if k in marked else "") for k, h, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, k, fmt) for k, _, fmt in columns) + " |" for r in rows]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in plots)]
    path.write_text("\n".join(lines) + "\n")
