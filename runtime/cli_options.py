"""click helpers shared by the CLIs: several-value options (`--layers 2 3`) and one-line errors."""
from __future__ import annotations

import sys
import time
from typing import Callable, TypeVar

import click

from runtime.disk import DiskFullError
from runtime.distributed import PeerError

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
    from runtime.location import location

    where = run_or_exit(lambda: location(path, storage_options, cache_dir))
    if not run_or_exit(where.holds_store):
        click.echo(f"error: no activation store at {where.url}: create one with generate_activations.py --out {path}", err=True)
        sys.exit(1)
    return where


def refuse_if_locked(path: str) -> None:
    """Exit with one line, before torch is imported, when another process is writing `path`."""
    from runtime.lock import OutputLock

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


def dist_timeout_option():
    """--dist_timeout: how long a rank waits for the others under torchrun."""
    return click.option("--dist_timeout", type=float, default=300.0,
                        help="Under torchrun: seconds a rank waits for the others before giving up with an error "
                             "naming the step.")



def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (its help text), read from the source."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def flat_fields(cls) -> list[tuple[object, object, str]]:
    """(dataclass field, its resolved type, its help) for every field of `cls`, the fields of
    nested dataclass fields in their place."""
    import dataclasses
    import typing

    hints, docs, out = typing.get_type_hints(cls), field_docs(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += flat_fields(hint)
        else:
            out.append((f, hint, docs.get(f.name, "")))
    return out


def dataclass_options(cls, aliases: dict[str, tuple[str, ...]] | None = None, whole_words: tuple[str, ...] = (),
                      extra_choices: dict[str, tuple[str, ...]] | None = None, off_flags: dict[str, str] | None = None,
                      optional: tuple[str, ...] = ()):
    """click options for every (flattened) field of dataclass `cls`: its name, its default, its
    docstring as help, a type from its annotation (numbers, strings, flags, choices of a
    Literal, several values for a tuple). `aliases`: more option names of a field;
    `whole_words`: tuple fields whose values are not split at commas; `extra_choices`: values a
    choice accepts beyond its Literal (mapped by the CLI). A dict field takes JSON. A flag whose
    default is True or None also gets an off switch: --no_<name>, or its name in
    `off_flags`. A field without a default is a required option, unless it is in `optional`
    (the command checks it itself, as it may run without it: it is then None)."""
    import dataclasses
    import typing

    aliases, extra_choices, off_flags = aliases or {}, extra_choices or {}, off_flags or {}

    def option(f, hint, help_text):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        given = {"default": default} if default is not dataclasses.MISSING else {"required": f.name not in optional}
        default = given.get("default")
        names = [f"--{f.name}", *aliases.get(f.name, ())]
        args = typing.get_args(hint)
        nullable = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if nullable else hint
        if typing.get_origin(base) is tuple:
            inner = typing.get_args(base)[0]
            choices = typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else None
            value_type = click.Choice([*choices, *extra_choices.get(f.name, ())]) if choices else str
            return click.option(*names, f.name, cls=SpaceSeparated, split_commas=f.name not in whole_words,
                                type=value_type, **given, show_default=bool(default), help=help_text)
        if base is bool:
            if default is not False:
                names[0] += "/" + off_flags.get(f.name, f"--no_{f.name}")
            return click.option(*names, f.name, is_flag=True, **given, help=help_text)
        if base is dict:
            return click.option(*names, f.name, type=str, default=None, help=help_text)
        if typing.get_origin(base) is typing.Literal:
            return click.option(*names, f.name, type=click.Choice(typing.get_args(base)), **given, help=help_text)
        value_type = COUNT if base is int else base
        return click.option(*names, f.name, type=value_type, **given, show_default=default is not None, help=help_text)

    def decorate(function):
        for f, hint, help_text in reversed(flat_fields(cls)):
            function = option(f, hint, help_text)(function)
        return function

    return decorate
