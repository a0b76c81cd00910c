"""A sweep's report: report.md (table + plots) and the terminal table (sweep.json and sweep.csv are
written by training/rundir.py)."""
from __future__ import annotations

import math
from pathlib import Path

# Columns of the terminal table and of report.md: (key, header, format). Knob columns appear
# when the members differ in that knob.
KNOBS = (("l1_coeff", "λ", "{:.2e}"), ("l0_coeff", "λ_L0", "{:.2e}"), ("k", "k", "{}"), ("lr", "lr", "{:.1e}"),
         ("seed", "seed", "{}"), ("bandwidth", "ε", "{:.1e}"), ("aux_coeff", "α", "{:.3g}"), ("p_end", "p_end", "{:.2g}"),
         ("decoder_init_norm", "init norm", "{:.3g}"))
TABLE = (
    ("name", "member", "{}"),
    ("arch", "arch", "{}"),
    *KNOBS,
    ("d_sae", "d_sae", "{}"),
    ("l0", "L0", "{:.1f}"),
    ("fvu", "FVU", "{:.3f}"),
    ("ce_recovered", "CE rec. (zero abl.)", "{:.3f}"),
    ("ce_recovered_mean_ablation", "CE rec. (mean abl.)", "{:.3f}"),
    ("kl", "KL", "{:.4f}"),
    ("dead_fraction", "dead", "{:.1%}"),
)


def _columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    """Columns with values; knob columns only where the members differ."""
    def shown(key: str) -> bool:
        values = {repr(r.get(key)) for r in rows}
        return any(key in r for r in rows) and (key not in dict((k, 0) for k, _, _ in KNOBS) or len(values) > 1)

    return [c for c in TABLE if shown(c[0])]


RECOVERY_KEYS = ("ce_recovered", "ce_recovered_mean_ablation")
BELOW_BASELINE = ("! below 0: with this member spliced in, the model's loss is higher than with the hook "
                  "ablated (zeroed, or set to its mean): as a replacement of the activations it is worse than "
                  "no information at all.")


def format_table(rows: list[dict]) -> str:
    """The members as an aligned text table (and the footnote on '!' when a recovery is below 0)."""
    columns = _columns(rows)
    cells = [[h for _, h, _ in columns]] + [[_cell(r, k, fmt) for k, _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    table = "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells
    )
    return table + ("\n" + BELOW_BASELINE if any(_below_baseline(r) for r in rows) else "")


def _below_baseline(row: dict) -> bool:
    return any(isinstance(row.get(k), float) and row[k] < 0 for k in RECOVERY_KEYS)


def write_report(out: Path, summary: dict, plots: list[Path]) -> Path:
    """report.md: what was trained on, the members' table, and the plots (relative links)."""
    rows = summary["members"]
    store = summary["store"]
    lines = [
        f"# Sweep report: {out.name}",
        "",
        f"Source `{store['source']}` of store `{store['path']}`; {len(rows)} members; "
        f"{store.get('eval_rows', '?')} held-out rows for reconstruction metrics"
        + (f", {_spliced(summary['eval'])} for CE/KL." if summary.get("eval", {}).get("n_sequences") else "."),
        "",
    ]
    if "clean_ce" in summary.get("eval", {}):
        ev = summary["eval"]
        lines += [f"CE clean {ev['clean_ce']:.4f}, zero ablation {ev['zero_ablation_ce']:.4f}, "
                  f"mean ablation {ev['mean_ablation_ce']:.4f}.", ""]
    lines += markdown_table(rows)
    if any("ce_recovered" in r for r in rows):
        lines += ["", "CE recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean), against zeroing the hook "
                      "(zero abl.) and against setting it to its mean over held-out rows (mean abl., the harder "
                      "baseline); 1 is the clean model."]
    if any(_below_baseline(r) for r in rows):
        lines += ["", BELOW_BASELINE]
    if any("per_source" in r for r in rows):
        lines += ["", *_per_source_table(rows)]
    if any("diff" in r for r in rows):
        space = next(r["diff"].get("space", "as stored") for r in rows if "diff" in r)
        lines += ["", f"Model-diff counts use relative decoder norms in the {space.split(':')[0]} space"
                      + (" (each source's decoder divided by its normalisation factor, the space the penalty acted on)."
                         if space.startswith("normalised") else ".")]
        loader = "Members load with `formats.crosscoder.load_crosscoder(<dir>)` (each has diff_summary.json, diff.png)"
    else:
        loader = "Members load with `sae_lens.SAE.load_from_disk(<dir>)`"
    lines += ["", f"{loader}: " + ", ".join(f"[{r['name']}]({r['dir']})" for r in rows), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def markdown_table(rows: list[dict]) -> list[str]:
    """The members' table as Markdown lines (report.md, the Hub's model card)."""
    columns = _columns(rows)
    return (["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + " --- |" * len(columns)]
            + ["| " + " | ".join(_cell(r, k, fmt) for k, _, fmt in columns) + " |" for r in rows])


def _per_source_table(rows: list[dict]) -> list[str]:
    """Crosscoders: FVU and CE recovered of every member on every source, and the diff counts."""
    sources = list(rows[0]["per_source"])
    header = ["member", *(f"FVU {s}" for s in sources), *(f"CE rec. (zero abl.) {s}" for s in sources)]
    diff_keys = [k for k in rows[0].get("diff", {}) if k.startswith("n_")]
    header += diff_keys
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        per = r["per_source"]
        cells = [r["name"], *(_cell(per[s], "fvu", "{:.3f}") for s in sources),
                 *(_cell(per[s], "ce_recovered", "{:.3f}") for s in sources),
                 *(str(r["diff"][k]) for k in diff_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def changed_figures(before: dict, after: dict) -> list[tuple[str, str, str, str]]:
    """(member, metric, old, new) for every number of two sweep summaries that differs: each
    member's figures, then the evaluation's baselines (as member "(baselines)"); "-" where absent."""
    pairs = [(new["name"], old, new) for old, new in zip(before["members"], after["members"])]
    pairs.append(("(baselines)", before.get("eval", {}), after.get("eval", {})))
    return [(name, key, _figure(old.get(key)), _figure(new.get(key)))
            for name, old, new in pairs for key in dict.fromkeys([*old, *new])
            if _is_figure(old.get(key)) and _is_figure(new.get(key)) and _figure(old.get(key)) != _figure(new.get(key))]


def _is_figure(value) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    flag = "!" if key in RECOVERY_KEYS and value < 0 else ""
    return fmt.format(value) + flag


def _spliced(evaluation: dict) -> str:
    """How many held-out sequences the CE/KL figures are over, and how many were asked for where
    the evaluation budget cut them."""
    used, asked = evaluation["n_sequences"], evaluation.get("n_sequences_asked", evaluation["n_sequences"])
    return f"{used} held-out sequences" + (f" (of {asked} asked: the --eval_budget allowed {used})" if used < asked else "")
