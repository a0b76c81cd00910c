"""click helpers shared by the CLIs: several-value options (`--layers 2 3`) and one-line errors."""
from __future__ import annotations

import sys
import time
from typing import Callable, TypeVar

import click

from cache.disk import DiskFullError
from cache.distributed import PeerError

T = TypeVar("T")
# Errors that mean "the input is wrong": shown as one line, never as a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, DiskFullError)


class SpaceSeparated(click.Option):
    """An option that takes every following word up to the next option: `--layers 2 3 5`.

    Commas work too (`--layers 2,3`) unless `split_commas=False`, as does repeating the option.
    """

    def __init__(self, *args, split_commas: bool = True, **kwargs):
        kwargs.setdefault("multiple", True)
        self.split_commas = split_commas
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            parser_option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if parser_option is not None:
                parser_option.process = self._greedy(parser_option.process, parser)

    def _greedy(self, process, parser):
        prefixes = tuple(parser._opt_prefixes)

        def take_all(value, state):
            values = [value]
            while state.rargs and not state.rargs[0].startswith(prefixes):
                values.append(state.rargs.pop(0))
            for item in values:
                for part in str(item).split(",") if self.split_commas else [str(item)]:
                    if part:
                        process(part, state)

        return take_all


def run_or_exit(step: Callable[[], T]) -> T:
    """Run `step`; a user error ends the program with its one-line message instead of a traceback."""
    try:
        return step()
    except (*USER_ERRORS, PeerError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted: rerun the same command to resume", err=True)
        sys.exit(130)


def took(start: float) -> str:
    """Wall time since `start` (time.perf_counter()), as 'in 3 min 12 s'."""
    seconds = time.perf_counter() - start
    return f"in {seconds:.1f} s" if seconds < 60 else f"in {int(seconds // 60)} min {int(seconds % 60)} s"


def require_store(path: str, storage_options: dict | None = None, cache_dir: str | None = None):
    """The Location of an existing store, or exit with one line: checked before torch, zarr or a
    model is imported, so a wrong --cache answers at once."""
    from cache.location import location

    where = run_or_exit(lambda: location(path, storage_options, cache_dir))
    if not run_or_exit(where.holds_store):
        click.echo(f"error: no activation store at {where.url}: create one with generate_activations.py --out {path}", err=True)
        sys.exit(1)
    return where


def refuse_if_locked(path: str) -> None:
    """Exit with one line, before torch is imported, when another process is writing `path`."""
    from cache.lock import OutputLock

    run_or_exit(lambda: OutputLock(path, "").refuse_if_held())


class Count(click.ParamType):
    """An integer that may be written with underscores: 2_000_000."""

    name = "integer"

    def convert(self, value, param, ctx):
        try:
            return int(str(value).replace("_", ""))
        except ValueError:
            self.fail(f"{value!r} is not a whole number", param, ctx)


COUNT = Count()


def storage_options_option(what: str):
    """--storage_options: JSON options of a store's fsspec filesystem."""
    return click.option("--storage_options", default=None,
                        help=f"{what} at a URL (s3://…): JSON options of its fsspec filesystem, e.g. "
                             "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' [default: credentials and endpoint from "
                             "the environment, AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, …].")


def dist_timeout_option():
    """--dist_timeout: how long a rank waits for the others under torchrun."""
    return click.option("--dist_timeout", type=float, default=300.0,
                        help="Under torchrun: seconds a rank waits for the others before giving up with an error "
                             "naming the step.")

