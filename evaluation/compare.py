"""Several finished sweeps side by side: one table and one set of frontier plots.

    python evaluate.py --compare runs/relu runs/topk runs/multi --out runs/compared

Reads each run directory's sweep.json (as evaluation left it) and writes into `out`:
compare.csv (every member of every run, with its run and architecture), compare.md (the table
and the plots) and the plots of evaluation/plots.py with one curve per run and architecture:
L0 against FVU, and L0 against CE recovered with zero and with mean ablation (the pareto plots a
sweep's report draws for one run). Runs of different models or hooks measure different things:
they are refused with one line naming the difference, unless `force`.
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


def compare_runs(run_dirs: list[str], out: str, force: bool = False) -> list[dict]:
    """Combine the runs' members into one table and one set of plots in `out`; return the rows."""
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
    _write_markdown(target / "compare.md", names, [d for d, _ in runs], rows, plots)
    return rows


def _run_names(dirs: list[Path]) -> list[str]:
    """Each run's directory name, made unique with its parent where two share one."""
    names = [d.name for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def _write_markdown(path: Path, names: list[str], dirs: list[Path], rows: list[dict], plots: list[Path]) -> None:
    columns = [("run", "run", "{}"), *(c for c in TABLE if any(c[0] in r for r in rows))]
    lines = ["# Runs compared", "", *(f"- `{n}`: {d}" for n, d in zip(names, dirs)), "",
             "| " + " | ".join(h for _, h, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, k, fmt) for k, _, fmt in columns) + " |" for r in rows]
    lines += ["", *(f"![{p.stem}]({p.name})" for p in plots)]
    path.write_text("\n".join(lines) + "\n")
