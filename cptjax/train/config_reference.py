"""`cptjax config reference`: every key of the training config, its type, default and meaning, in
Markdown, generated from the config dataclasses and the comment on each field (the one place a key
is documented). docs/config.md is this output; a test fails when they drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Annotated, Literal, Union

from cptjax.core.paths import USER_PATH

_FIELD = re.compile(r"^    (\w+): [^#]*?(?:#\s*(.*))?$")


def _comments(cls) -> dict[str, str]:
    """Field name -> the comment on its line in the class body (own fields, then inherited)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        for line in inspect.getsource(klass).splitlines():
            match = _FIELD.match(line)
            if match and match.group(1) in {f.name for f in dataclasses.fields(klass)}:
                docs[match.group(1)] = match.group(2) or ""
    return docs


def _type(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return "path" if USER_PATH in args[1:] else _type(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, typing.get_origin(int | None)):
        return " or ".join(_type(a) for a in args).replace("NoneType", "null")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "list of entries (below)" if dataclasses.is_dataclass(args[0]) else f"list of {_type(args[0])}"
        return "list"
    if dataclasses.is_dataclass(tp):
        return "section (below)"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _default(field: dataclasses.Field) -> str:
    if field.default is dataclasses.MISSING:
        return "required"
    value = field.default
    if dataclasses.is_dataclass(value):
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[]" if not value else "see `cptjax config show`"
    return f"`{value}`"


def _entries(cls, prefix: str) -> list[tuple[str, list[tuple[str, str, str, str]]]]:
    """[(section key, rows of (key, type, default, meaning))], nested sections after their parent."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = _comments(cls)
    rows, nested = [], []
    for field in dataclasses.fields(cls):
        if "set_from" in field.metadata:  # not a key: the tree fills it from another section
            continue
        tp, key = hints[field.name], f"{prefix}{field.name}"
        if not docs.get(field.name):
            raise ValueError(f"{cls.__name__}.{field.name} has no comment: write what it does on its line")
        element = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else None
        union = typing.get_origin(tp) in (Union, typing.get_origin(int | None))
        optional = [a for a in typing.get_args(tp) if union and dataclasses.is_dataclass(a)]  # a section or null
        if dataclasses.is_dataclass(tp) or optional:
            nested += _entries(optional[0] if optional else tp, f"{key}.")
        elif element is not None and dataclasses.is_dataclass(element):
            nested += _entries(element, f"{key}[].")
        rows.append((key, _type(tp), _default(field), docs[field.name]))
    return [(prefix.rstrip("."), rows), *nested]


def reference_markdown() -> str:
    """The whole reference, one table per section."""
    from cptjax.train.config import TrainConfig

    out = []
    for section, rows in _entries(TrainConfig, ""):
        out.append(f"**`{section}`**\n" if section else "**top level**\n")
        out.append("| key | type | default | what it does |")
        out.append("|---|---|---|---|")
        out += [f"| `{key}` | {tp} | {default} | {doc} |" for key, tp, default, doc in rows]
        out.append("")
    return "\n".join(out)
