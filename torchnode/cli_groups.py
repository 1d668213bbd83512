"""Option groups for typer commands: a dataclass whose fields are typer options, taken by a command as ONE parameter.

typer sees each group's fields as flags (same spelling, defaults and help as if they were written out); the command
receives the group built from them. So a group of flags shared by several commands is declared once, and a
command's signature lists groups instead of dozens of flags. `flag_help` and the group's defaults read the
dataclasses the node and client use (node/limits.py, node/config.py, client/config.py), so no default or help text
is typed twice.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, get_type_hints


def flag_help(cls: type, name: str, extra: str = "") -> str:
    """The help text field `name` of dataclass `cls` declares (metadata "help"), with `extra` appended."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata["help"] + extra
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def is_group(annotation: object) -> bool:
    return isinstance(annotation, type) and dataclasses.is_dataclass(annotation)


def option_groups(command: Callable[..., Any]) -> Callable[..., Any]:
    """Lets `command` take option groups: each parameter annotated with a dataclass becomes that dataclass's fields
    in typer's eyes, and is built from them before the command runs."""
    hints = get_type_hints(command, include_extras=True)
    params: list[inspect.Parameter] = []
    groups: dict[str, tuple[type, list[str]]] = {}
    for p in inspect.signature(command).parameters.values():
        annotation = hints.get(p.name, p.annotation)
        if not is_group(annotation):
            params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=annotation))
            continue
        fields = dataclasses.fields(annotation)
        field_hints = get_type_hints(annotation, include_extras=True)
        groups[p.name] = (annotation, [f.name for f in fields])
        for f in fields:
            if f.default is dataclasses.MISSING:
                raise TypeError(f"option group {annotation.__name__}: field {f.name} needs a default")
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=field_hints[f.name]
                )
            )
    names = [p.name for p in params]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TypeError(f"{command.__name__}: flags declared twice: {twice}")

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        for name, (group, fields) in groups.items():
            values[name] = group(**{f: values.pop(f) for f in fields})
        return command(**values)

    # typer reads the flags from inspect.signature, which takes __signature__ when a function carries one;
    # mypy knows no such attribute on functions, hence the ignore
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run
