"""Command-line flags made from settings dataclasses, so that every default is written once: in the dataclass.

A field declared with `setting(default, help, ...)` is also a flag (`--field-name` unless `flags`
says otherwise; the other keywords are argparse's: type, choices, nargs, metavar, action).
`add_setting_flags` adds the flags of a settings class to a parser with the dataclass's defaults, and
`settings_from_args` builds the settings back from the parsed flags. Fields made with plain
`dataclasses.field` (or a bare default) are settings without a flag.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable, TypeVar

FLAG = "flag"
S = TypeVar("S")


def setting(default: Any, help: str | None = None, *, flags: Iterable[str] = (), **options: Any) -> Any:
    """A settings field with `default` that is also a command-line flag; `options` go to `add_argument`.

    `help` may use argparse's `%(default)s`, so the text never repeats the default."""
    return dataclasses.field(default=default, metadata={FLAG: {"flags": tuple(flags), "help": help, **options}})


def flag_fields(settings_class: type, names: Iterable[str] | None = None,
                exclude: Iterable[str] = ()) -> list[dataclasses.Field]:
    """The fields of `settings_class` that are flags: those in `names` (in that order), else all but `exclude`."""
    fields = {f.name: f for f in dataclasses.fields(settings_class) if FLAG in f.metadata}
    chosen = list(names) if names is not None else [name for name in fields if name not in set(exclude)]
    unknown = [name for name in chosen if name not in fields]
    if unknown:
        raise ValueError(f"{settings_class.__name__} has no flag field(s) {', '.join(unknown)}")
    return [fields[name] for name in chosen]


def add_setting_flags(parser: argparse.ArgumentParser, settings_class: type,
                      names: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> None:
    """Add the flags of `settings_class` (see `flag_fields`) to `parser`, each defaulting to its field's default."""
    for field in flag_fields(settings_class, names, exclude):
        options = dict(field.metadata[FLAG])
        flags = options.pop("flags") or (f"--{field.name.replace('_', '-')}",)
        parser.add_argument(*flags, dest=field.name, default=field.default, **options)


def settings_from_args(settings_class: type[S], args: argparse.Namespace, **values: Any) -> S:
    """`settings_class` from the parsed flags: fields without a flag on this parser keep their defaults,
    `values` override; lists from `nargs` flags become tuples (settings are frozen)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(settings_class) if hasattr(args, f.name)}
    given = {name: tuple(value) if isinstance(value, list) else value for name, value in given.items()}
    return settings_class(**{**given, **values})
