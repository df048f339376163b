"""Typed config trees: YAML mappings -> frozen dataclasses, with errors that name the dotted key.

`from_dict(cls, mapping, prefix)` builds a frozen dataclass (recursively) from plain data, refusing
unknown keys and values of the wrong type. `apply_overrides` applies `--set a.b=value` strings, the
value parsed as YAML. `to_dict` is the inverse, for `cptjax config show` and checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Annotated, Any, Literal, Union

import yaml

from cptjax.core.errors import CptjaxError
from cptjax.core.paths import USER_PATH, user_path


def from_dict(cls, data: Any, prefix: str = ""):
    """Builds dataclass `cls` from `data`, a mapping; `prefix` names it in messages ('data'), ''
    for the root of a tree (messages then read 'training.steps: ...')."""
    return _convert(cls, data, prefix)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def to_dict(obj) -> Any:
    """Plain data that from_dict reads back. A field whose metadata names `set_from` (filled from
    another section by the tree's loader, not a key of its own) is left out."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if "set_from" not in f.metadata}
    if isinstance(obj, (tuple, list)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Applies 'a.b.c=value' strings (value parsed as YAML) to a nested dict; returns a new dict."""
    import copy

    tree = copy.deepcopy(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CptjaxError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise CptjaxError(f"--set {item!r}: value is not valid YAML ({yaml_error(err)})") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise CptjaxError(f"--set {key}: {part!r} is not a section")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def yaml_error(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line."""
    return " ".join(str(err).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping; keep one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_mapping(path, key: str) -> dict:
    """A YAML file whose top level is a mapping (a config); `key` names the flag that gave it."""
    file = user_path(path, key)
    if not file.is_file():
        raise CptjaxError(f"{key} {file}: no such file")
    try:
        raw = yaml.load(file.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise CptjaxError(f"{file}: not valid YAML ({yaml_error(err)})") from None
    if not isinstance(raw, dict):
        raise CptjaxError(f"{file}: expected a mapping of sections at the top level")
    return raw


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return "list"
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _convert(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *marks = typing.get_args(tp)
        value = _convert(inner, value, key)
        return str(user_path(value, key)) if USER_PATH in marks and value is not None else value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise CptjaxError(f"{key or 'config'}: expected a section (mapping), got {value!r}")
        hints = typing.get_type_hints(tp, include_extras=True)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = [k for k in value if k not in fields]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CptjaxError(f"{_join(key, str(unknown[0]))}: unknown key{hint} "
                              f"Allowed: {', '.join(fields)}")
        kwargs = {}
        for name in fields:
            if name in value:
                kwargs[name] = _convert(hints[name], value[name], _join(key, name))
            elif (fields[name].default is dataclasses.MISSING
                  and fields[name].default_factory is dataclasses.MISSING):
                raise CptjaxError(f"{_join(key, name)}: required key is missing")
        try:
            return tp(**kwargs)
        except CptjaxError as err:  # the class's own checks; name the section unless they did
            message = str(err)
            if not key or message.startswith(key.split(".")[0].split("[")[0]):
                raise
            raise CptjaxError(f"{key}: {message}") from None
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise CptjaxError(f"{key}: {value!r} is not allowed; choose one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, key)
            except CptjaxError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise CptjaxError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise CptjaxError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise CptjaxError(f"{key}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise CptjaxError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CptjaxError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML 1.1 reads '3e-4' as a string
                except ValueError:
                    pass
            raise CptjaxError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise CptjaxError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            raise CptjaxError(f"{key}: expected null, got {value!r}")
        return None
    raise TypeError(f"{key}: unsupported config type {tp!r}")
