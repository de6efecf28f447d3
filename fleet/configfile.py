"""Loads YAML config files into pydantic models, with errors that name file, line and rule.

Used by the fleet file and supervisor.yaml alike: `file:line: key.path: what was expected`.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fleet.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
KeyLines = dict[tuple, int]
# Extra checks a loader adds to the model's own: (data, lines) → [(line, "file:line: …")].
ExtraErrors = Callable[[str, dict, KeyLines], list[tuple[int, str]]]


def load_model(path: Path | str, model: type[M], *, what: str = "config file",
               extra_errors: ExtraErrors | None = None,
               skip_error: Callable[[dict], bool] = lambda err: False) -> M:
    """Parse `path` as YAML and validate it as `model`; raise ConfigError on anything wrong."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{shown}{line}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown}:1: expected a mapping of settings at the top level, got {type(data).__name__}")
    lines = key_lines(node) if node is not None else {}
    if twice := repeated_keys(node, shown) if node is not None else []:
        raise ConfigError("\n".join(twice))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        found = [(line_of(tuple(e["loc"]), lines), describe(shown, lines, e, model))
                 for e in exc.errors() if not skip_error(e)]
        found += extra_errors(shown, data, lines) if extra_errors else []
        raise ConfigError("\n".join(text for _, text in sorted(found, key=lambda f: f[0]))) from None


def key_lines(node: yaml.Node, path: tuple = ()) -> KeyLines:
    """Map each key path (('processes', 1, 'restart')) to its 1-based line in the file."""
    lines = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            sub = (*path, key.value)
            lines.update(key_lines(value, sub))
            lines[sub] = key.start_mark.line + 1  # the key's own line, not its value's
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines.update(key_lines(item, (*path, i)))
    return lines


def repeated_keys(node: yaml.Node, shown: str, path: tuple = ()) -> list[str]:
    """YAML keeps the last of two equal keys without a word: name each repeat and its lines."""
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, value in node.value:
            sub = (*path, key.value)
            line = key.start_mark.line + 1
            if key.value in first:
                found.append(f"{shown}:{line}: {dotted(sub)}: given twice (first on line {first[key.value]}); keep one")
            first.setdefault(key.value, line)
            found += repeated_keys(value, shown, sub)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += repeated_keys(item, shown, (*path, i))
    return found


def line_of(loc: tuple, lines: KeyLines) -> int:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return 1


def dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def describe(shown: str, lines: KeyLines, err: dict[str, Any], model: type[BaseModel]) -> str:
    """One pydantic error in the operator's words, at the line it comes from."""
    loc = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        where, what = loc[:-1], f"missing required key {loc[-1]!r}"
    elif kind == "extra_forbidden":
        allowed = allowed_keys(model, loc[:-1])
        where, what = loc, f"unknown key {loc[-1]!r}" + (f"; expected one of {', '.join(allowed)}" if allowed else "")
    elif kind in ("literal_error", "enum"):
        expected = str(err.get("ctx", {}).get("expected", "")).replace("'", "").replace(" or ", ", ")
        where, what = loc, f"{value!r} is not one of {expected}"
    elif kind == "value_error":
        where, what = loc, err["msg"].removeprefix("Value error, ")
    elif kind == "list_type" and loc and loc[-1] in ("command", "check_command", "check"):
        where, what = loc, f"{value!r} is not a list of arguments; write it as an argv list, e.g. [python, server.py]"
    else:
        where, what = loc, f"{value!r} is not valid: {err['msg'][:1].lower()}{err['msg'][1:]}"
    return f"{shown}:{line_of(loc, lines)}: {dotted(where)}: {what}"


def allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (nested) model at `loc`, for 'expected one of' hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if _is_model(current) else None
        if field is None:
            return []
        current = _model_in(field.annotation)
        if current is None:
            return []
    return list(current.model_fields) if _is_model(current) else []


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if _is_model(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
