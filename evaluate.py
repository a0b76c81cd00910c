"""Evaluation CLI: measure the members of a trained sweep and write its report.

    python evaluate.py --run_dir runs/l1-sweep --n_sequences 128
    python evaluate.py --run_dir runs/l1-sweep --browser      # the browser only, from the finished evaluation
    python evaluate.py --compare runs/relu runs/topk --out runs/compared
    python evaluate.py --run_dir runs/l1-sweep --push USER/NAME     # then upload it to the Hugging Face Hub

Held-out reconstruction metrics (L0, MSE, FVU, explained variance, cosine, L2 ratio, dead and
dense fractions, per-latent density), the spliced CE/KL with zero- and mean-ablation baselines,
plots and report.md. train_sweep.py runs the same at the end of training unless --no_eval.
The evaluation's options are generated from evaluation/config.py's fields.

--browser (or --push) on an evaluated run (report.md and every member's figures in sweep.json) builds the
browser (or uploads) only and leaves report.md, sweep.json and the plots as they are; on a run without
results it evaluates first; --reevaluate evaluates again first. Evaluating a run evaluated
before prints each figure that changed and keeps the previous report as report.previous.md.
"""
from __future__ import annotations

import click

from runtime.cli_options import SpaceSeparated, dataclass_options, run_or_exit, took
from evaluation.config import EvalConfig


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@dataclass_options(EvalConfig, optional=("run_dir",), aliases={"n_sequences": ("--eval_sequences",)})
@click.option("--compare", "compare", cls=SpaceSeparated, type=str, default=(),
              help="Instead: several finished run directories, drawn in one set of plots and one table (--out).")
@click.option("--out", "--output_dir", "out", default=None, help="With --compare: where compare.md, compare.csv and the plots go.")
@click.option("--force", is_flag=True, help="With --compare: compare runs of different models or hooks anyway.")
@click.option("--browser", is_flag=True,
              help="Write browser/: a static feature browser of every latent (file://). On an evaluated run, the "
                   "browser only: report.md and sweep.json stay as they are (evaluation options are not used).")
@click.option("--reevaluate", is_flag=True,
              help="With --browser: evaluate the run again first (prints the figures that change; the previous "
                   "report is kept as report.previous.md).")
@click.option("--browser_rows", type=int, default=None,
              help="Build the browser from the first N training rows [default: the store's held-out rows].")
@click.option("--browser_format", type=click.Choice(["site", "neuronpedia"]), default="site",
              help="site: browser/ (static pages); neuronpedia: neuronpedia/<model>/<source>/, Neuronpedia's bulk-import layout.")
@click.option("--serve", is_flag=True, help="After writing the browser, serve it on http://127.0.0.1:8000 (Ctrl-C stops).")
@click.option("--push", default=None, metavar="USER/NAME", callback=lambda ctx, param, value: repo_id_option(value),
              help="Then upload the run to this Hugging Face Hub repository (members, sweep.json, report.md, plots, "
                   "a model card); needs a token (HF_TOKEN or `hf auth login`). On an evaluated run, the upload only.")
def main(compare: tuple[str, ...], out: str | None, force: bool, browser: bool, reevaluate: bool,
         browser_rows: int | None, browser_format: str, serve: bool, push: str | None, **options) -> None:
    """Evaluate every member of a sweep and write report.md; or compare several sweeps."""
    import time
    from pathlib import Path

    start = time.perf_counter()
    if compare:
        _compare(compare, out, force, start)
        return
    if options["run_dir"] is None:
        raise click.UsageError("give --run_dir (a sweep to evaluate) or --compare RUN RUN … --out DIR")
    if not (Path(options["run_dir"]) / "sweep.json").is_file():  # answered before torch is imported
        click.echo(f"error: {options['run_dir']} holds no finished sweep (no sweep.json): run train_sweep.py first", err=True)
        raise SystemExit(1)

    browser = browser or browser_rows is not None or browser_format != "site" or serve
    if reevaluate and not (browser or push):
        raise click.UsageError("--reevaluate goes with --browser or --push (without them, evaluate.py always evaluates)")
    if not (browser or push) or reevaluate or not evaluated(Path(options["run_dir"])):
        _evaluate(options)
    else:
        click.echo("using the run's evaluation as it is (report.md, sweep.json unchanged; --reevaluate "
                   "evaluates again first)")
    if browser:
        write_browser(options["run_dir"], browser_rows, browser_format, options["device"], serve, push)
    if push:
        push_to_hub(options["run_dir"], push)
    click.echo(f"\ndone {took(start)}: open {options['run_dir']}/report.md")


def evaluated(run_dir: Path) -> bool:
    """Whether the run holds an evaluation's results: report.md, and every member's figures."""
    import json

    rows = json.loads((run_dir / "sweep.json").read_text())["members"]
    return (run_dir / "report.md").is_file() and all("fvu" in r for r in rows)


def _evaluate(options: dict) -> None:
    from runtime.location import parse_storage_options
    from evaluation.report import format_table
    from evaluation.runner import evaluate_run

    options["storage_options"] = run_or_exit(lambda: parse_storage_options(options["storage_options"]))
    click.echo(format_table(run_or_exit(lambda: evaluate_run(EvalConfig(**options)))))


def repo_id_option(value: str | None) -> str | None:
    """--push / --hf_repo_id: USER/NAME as the Hub accepts it, checked before anything runs."""
    if value is None:
        return None
    from formats.hub import check_repo_id

    try:
        return check_repo_id(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def push_to_hub(run_dir: str, repo_id: str) -> None:
    """Upload the run (formats/hub.py); a failure is one line and exit code 1, the run left as it is."""
    from formats.hub import PushError, push_run

    try:
        url = push_run(run_dir, repo_id)
    except PushError as err:
        click.echo(f"error: {err}", err=True)
        raise SystemExit(1)
    click.echo(f"pushed to https://huggingface.co/{repo_id} ({url})")


def write_browser(run_dir: str, rows: int | None, form: str, device: str, serve: bool, hf_repo_id: str | None = None) -> None:
    """browser/ (or neuronpedia/) beside report.md; --serve opens it over http on 127.0.0.1."""
    from evaluation.browser import BrowserConfig, build_browser

    cfg = BrowserConfig(run_dir=run_dir, rows=rows, format=form, device=device, hf_repo_id=hf_repo_id)
    target = run_or_exit(lambda: build_browser(cfg))
    click.echo(f"browser: open {target / 'index.html'}" if form == "site" else f"Neuronpedia import files in {target}")
    if serve and form == "site":
        import functools
        import http.server

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(target))
        with http.server.ThreadingHTTPServer(("127.0.0.1", 8000), handler) as server:
            click.echo("serving on http://127.0.0.1:8000/index.html (Ctrl-C stops)")
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                pass


def _compare(run_dirs: tuple[str, ...], out: str | None, force: bool, start: float) -> None:
    if out is None:
        raise click.UsageError("--compare needs --out DIR for its table and plots")
    from evaluation.compare import compare_runs

    rows, unlike = run_or_exit(lambda: compare_runs(list(run_dirs), out, force))
    for line in unlike:
        click.echo(line)
    click.echo(f"{len(rows)} members of {len(run_dirs)} runs compared; done {took(start)}: open {out}/compare.md")


if __name__ == "__main__":
    main()
