"""Command-line flags generated from a pydantic model's fields (``cnn-codes train``).

One flag per field, ``--field-name`` for ``field_name``; its type, choices and bounds come from
the annotation and the ``Field(ge=..., gt=..., le=..., lt=...)`` constraints, its help from the
field's ``description`` or else the model docstring's ``Attributes:`` section, followed by the
field's default. Every flag defaults to None, meaning "not given", so that
:func:`given_values` returns only what the command line set (it overrides a config file).
"""

from __future__ import annotations

import argparse
import inspect
import operator
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

_SCALARS = (bool, int, float, str, Path)
_BOUNDS = (("ge", operator.ge, ">="), ("gt", operator.gt, ">"),
           ("le", operator.le, "<="), ("lt", operator.lt, "<"))
_ROLE = re.compile(r":\w+:`~?([^`]+)`")  # :func:`training.data.train_transform`


def flag_name(field: str) -> str:
    """The flag of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-")


def docstring_attributes(model: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` section of ``model``'s docstring.

    Google style: ``name: text`` at one indentation, continuation lines indented deeper;
    the section ends at the first non-blank line indented less than its entries.
    """
    lines = inspect.cleandoc(model.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    except StopIteration:
        return {}
    found: dict[str, list[str]] = {}
    indent: int | None = None
    current: list[str] = []
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        match = re.match(r"(\w+): ?(.*)", line.strip())
        if depth < indent:
            break
        if depth == indent and match:
            current = found.setdefault(match.group(1), [match.group(2)])
        else:
            current.append(line.strip())
    return {name: " ".join(parts).strip() for name, parts in found.items()}


def _plain(text: str) -> str:
    """Docstring markup to plain help text (argparse ``%`` escaped)."""
    text = _ROLE.sub(r"\1", text).replace("``", "")
    return text.replace("%", "%%")


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _bounded(kind: type, field: FieldInfo) -> Callable[[str], Any]:
    """``kind`` (int/float) as an argparse type that enforces the field's numeric bounds."""
    checks = [(op, sign, getattr(meta, attr)) for meta in field.metadata
              for attr, op, sign in _BOUNDS if getattr(meta, attr, None) is not None]
    if not checks:
        return kind

    def convert(text: str) -> Any:
        value = kind(text)
        for op, sign, bound in checks:
            if not op(value, bound):
                raise argparse.ArgumentTypeError(f"must be {sign} {bound}, got {value}")
        return value

    convert.__name__ = kind.__name__  # argparse: "invalid int value: 'x'"
    return convert


def _flag_kwargs(field: FieldInfo) -> dict[str, Any]:
    """``add_argument`` keyword arguments (type/choices/action) for one field."""
    annotation = _unwrap_optional(field.annotation)
    if typing.get_origin(annotation) is Literal:
        choices = list(typing.get_args(annotation))
        return {"choices": choices, "type": type(choices[0])}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float):
        return {"type": _bounded(annotation, field)}
    if annotation in _SCALARS:
        return {"type": annotation}
    raise TypeError(f"no command-line flag for a field of type {field.annotation!r}")


def _help(name: str, field: FieldInfo, described: dict[str, str]) -> str:
    """The help of a field's flag: its description, then its default."""
    text = _plain(field.description or described.get(name, ""))
    if field.is_required():
        return text
    default = field.get_default(call_default_factory=True)
    shown = default if not isinstance(default, bool) else ("on" if default else "off")
    return f"{text} (default: {_plain(str(shown))})".strip()


def add_model_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *,
                    exclude: Iterable[str] = ()) -> list[str]:
    """Add a flag per field of ``model`` (those not in ``exclude``) to ``parser``.

    Returns:
        The field names that got a flag, in declaration order.

    Raises:
        TypeError: a field's type has no flag form (supported: bool, int, float, str, Path,
            Literal and their ``| None``).
    """
    described = docstring_attributes(model)
    added = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        parser.add_argument(flag_name(name), dest=name, default=None,
                            help=_help(name, field, described), **_flag_kwargs(field))
        added.append(name)
    return added


def given_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` that the command line set (flags left out are None)."""
    return {name: getattr(args, name) for name in model.model_fields
            if getattr(args, name, None) is not None}
