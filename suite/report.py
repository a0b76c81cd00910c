"""A suite's report.md and its plot of pruned FVU against the number of connections C."""
from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

CE_ROWS = (("ce_clean", "the model as it is"), ("ce_zero_ablation", "every MLP output zeroed"),
           ("ce_zero_ablation_block", "every attention and MLP output zeroed"),
           ("ce_vanilla_mlp", "every MLP replaced by its transcoder"),
           ("ce_vanilla_suite", "… and every attention output by its SAE"),
           ("ce_pruned_suite", "… with every transcoder on its pruned input"),
           ("ce_vanilla_suite_untuned", "the vanilla suite before fine-tuning"),
           ("ce_pruned_suite_untuned", "the pruned suite before fine-tuning"))


def write(out: Path, summary: dict) -> Path:
    lines = [f"# Sparsely connected suite: {out.name}", "",
             f"Store `{summary['config']['cache']}`, {summary['layout']['attn'].__len__()} layers, "
             f"k {summary['config']['k']}, attention and MLP run {'in parallel' if summary['layout']['parallel'] else 'in sequence'}.", ""]
    for result in summary["settings"]:
        lines += _setting(out, result)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _setting(out: Path, result: dict) -> list[str]:
    s = result["setting"]
    C = s["n_connections"]
    lines = [f"## c {s['c']:g}, C {C}, lr {s['lr']:g} (`{result['dir']}`)", ""]
    modules = result["modules"]
    header = ["module", "FVU vanilla", f"FVU pruned (C {C})", "explained by C (median)"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in sorted(modules, key=lambda n: (int(n.lstrip("atnmlp")), n)):
        entry = modules[name]
        pruned = entry.get(f"pruned_C{C}", {}).get("fvu")
        fraction = result["explained_fraction"].get(name, {}).get("median")
        lines.append(f"| {name} | {_f(entry['vanilla']['fvu'])} | {_f(pruned)} | {_f(fraction)} |")
    if "ce" in result:
        lines += ["", "| loss | CE | KL(clean ‖ ·) | recovered vs MLP zero ablation | vs block zero ablation |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        ce = result["ce"]
        for key, meaning in CE_ROWS:
            name = key[3:]
            if key in ce:
                lines.append(f"| `{key}`: {meaning} | {_f(ce[key])} | {_f(ce.get('kl_' + name))} | "
                             f"{_f(ce.get('ce_recovered_' + name))} | {_f(ce.get('ce_recovered_' + name + '_vs_block'))} |")
    plot = _plot(out / result["dir"] / "pruned_fvu_vs_C.png", result)
    lines += ["", f"![pruned FVU against C]({plot.relative_to(out)})", "",
              f"Exports (SAELens directories, a circuit-tracer transcoder set, the connection index): `{result['dir']}/export/`.", ""]
    return lines


def _plot(path: Path, result: dict) -> Path:
    counts = result["connection_counts"]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for name, entry in sorted(result["modules"].items()):
        if name.startswith("mlp"):
            ax.plot(counts, [entry[f"pruned_C{C}"]["fvu"] for C in counts], "o-", label=name)
            ax.axhline(entry["vanilla"]["fvu"], color=ax.lines[-1].get_color(), linestyle=":", linewidth=1)
    ax.set(xscale="log", xlabel="connections per latent C", ylabel="pruned FVU (held-out; dotted: vanilla)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _f(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
