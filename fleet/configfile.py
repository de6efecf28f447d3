"""Loads YAML config files into pydantic models, with errors that name file, line and rule.

Used by the fleet file and supervisor.yaml alike: `file:line: key.path: what was expected`.
A config file is read as untrusted input: its size, nesting and alias expansion are bounded
before anything is built from it, so a hostile file costs milliseconds and one line of error.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from fleet.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
KeyLines = dict[tuple, int]
# Extra checks a loader adds to the model's own: (data, lines) → [(line, "file:line: …")].
ExtraErrors = Callable[[str, dict, KeyLines], list[tuple[int, str]]]
# Checks of the validated model that need more than the model knows (e.g. where the file is):
# model → [(key path, what is wrong)], reported at the key's line.
AfterChecks = Callable[[Any], list[tuple[tuple, str]]]

# Safety bounds against hostile files, not settings: a fleet file of a thousand apps is
# ~200 KB, ~20 000 values and 6 levels deep.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_VALUES = 100_000  # after expanding aliases: a "billion laughs" file stops here
MAX_ERRORS = 20  # problems listed; the rest are counted
MAX_SHOWN = 60  # characters of an offending value quoted in an error

_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_model(
    path: Path | str,
    model: type[M],
    *,
    what: str = "config file",
    extra_errors: ExtraErrors | None = None,
    skip_error: Callable[[ErrorDetails], bool] = lambda err: False,
    after: AfterChecks | None = None,
) -> M:
    """Parse `path` as YAML and validate it as `model`; raise ConfigError on anything wrong."""
    path = Path(path)
    shown = str(path)
    text = _read(path, shown, what)
    node, data = _parse(text, shown, what)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{shown}:1: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    lines = key_lines(node) if node is not None else {}
    if twice := repeated_keys(node, shown) if node is not None else []:
        raise ConfigError(_joined(twice))
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        found = [
            (line_of(tuple(e["loc"]), lines), describe(shown, lines, e, model))
            for e in exc.errors()
            if not skip_error(e)
        ]
        found += extra_errors(shown, data, lines) if extra_errors else []
        found.sort(key=lambda f: f[0])
        raise ConfigError(_joined([text for _, text in found])) from None
    problems = after(config) if after else []
    if problems:
        late = sorted((line_of(loc, lines), f"{dotted(loc)}: {why}") for loc, why in problems)
        raise ConfigError(_joined([f"{shown}:{line}: {text}" for line, text in late]))
    return config


def _read(path: Path, shown: str, what: str) -> str:
    """The file's text, refusing anything over MAX_CONFIG_BYTES before reading it all."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{shown}: the {what} is over {MAX_CONFIG_BYTES} bytes, the most a "
            f"{what} may be; is this the right file?"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{shown}: the {what} is not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})"
        ) from None


def _parse(text: str, shown: str, what: str) -> tuple[yaml.Node | None, Any]:
    """(node tree, data) of one YAML document, after `_measure` has bounded its shape."""
    try:
        _measure(text, shown, what)
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{shown}{line}: invalid YAML: {_clip(problem)}") from None
    except (ValueError, OverflowError) as exc:  # a scalar YAML types but Python cannot hold
        reason = str(exc).split("; use sys.set_int_max_str_digits")[0]  # not the operator's knob
        raise ConfigError(
            f"{shown}: a value in the {what} cannot be read: {_clip(reason)}"
        ) from None
    return node, data


def _measure(text: str, shown: str, what: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH, more than MAX_VALUES values once aliases are
    expanded, and an alias used inside its own anchor, from the event stream alone: nothing
    is built, so a hostile file is refused at the event that crosses a bound."""
    open_frames: list[list] = []  # [anchor, values, height] of each open collection
    sizes: dict[str, tuple[int, int]] = {}  # anchor → (values, height) once closed
    total = 0
    for event in yaml.parse(text, Loader=_Loader):
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, yaml.CollectionStartEvent):
            open_frames.append([event.anchor, 1, 1])
            size, height = 1, 0
        elif isinstance(event, yaml.CollectionEndEvent):
            anchor, size, height = open_frames.pop()
            if anchor is not None:
                sizes[anchor] = (size, height)
            if open_frames:
                open_frames[-1][1] += size
                open_frames[-1][2] = max(open_frames[-1][2], height + 1)
            continue
        elif isinstance(event, yaml.AliasEvent):
            if any(frame[0] == event.anchor for frame in open_frames):
                raise ConfigError(
                    f"{shown}:{line}: alias *{_clip(str(event.anchor))} is used "
                    "inside the value it names (a loop); write the value out"
                )
            # An alias always names an anchor; "" only satisfies the stubs' `str | None`.
            size, height = sizes.get(event.anchor or "", (1, 1))
        elif isinstance(event, yaml.ScalarEvent):
            size, height = 1, 1
            if event.anchor is not None:
                sizes[event.anchor] = (1, 1)
        else:
            continue
        total += size
        if len(open_frames) + height > MAX_DEPTH:
            raise ConfigError(
                f"{shown}:{line}: nested more than {MAX_DEPTH} levels deep; a {what} "
                "needs only a few"
            )
        if total > MAX_VALUES:
            raise ConfigError(
                f"{shown}:{line}: more than {MAX_VALUES} values once YAML aliases "
                f"are expanded; a {what} needs far fewer"
            )
        if not isinstance(event, yaml.CollectionStartEvent) and open_frames:
            open_frames[-1][1] += size
            open_frames[-1][2] = max(open_frames[-1][2], height + 1)


def _joined(problems: list[str]) -> str:
    """One line per problem, the first MAX_ERRORS of them."""
    more = len(problems) - MAX_ERRORS
    tail = [f"... and {more} more problems"] if more > 0 else []
    return "\n".join(problems[:MAX_ERRORS] + tail)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(value: Any) -> str:
    """repr() of an offending value, cut short: a 5 MB value must not become a 5 MB error."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[: MAX_SHOWN - 4]}…{text[-3:]}"


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
                found.append(
                    f"{shown}:{line}: {dotted(sub)}: given twice "
                    f"(first on line {first[key.value]}); keep one"
                )
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


def describe(shown: str, lines: KeyLines, err: ErrorDetails, model: type[BaseModel]) -> str:
    """One pydantic error in the operator's words, at the line it comes from."""
    loc = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        where, what = loc[:-1], f"missing required key {loc[-1]!r}"
    elif kind == "extra_forbidden":
        allowed = allowed_keys(model, loc[:-1])
        hint = f"; expected one of {', '.join(allowed)}" if allowed else ""
        where, what = loc, f"unknown key {loc[-1]!r}{hint}"
    elif kind in ("literal_error", "enum"):
        expected = str(err.get("ctx", {}).get("expected", ""))
        expected = expected.replace("'", "").replace(" or ", ", ")
        where, what = loc, f"{_shown(value)} is not one of {expected}"
    elif kind == "value_error":
        where, what = loc, _clip(err["msg"].removeprefix("Value error, "))
    elif kind == "list_type" and loc and loc[-1] in ("command", "check_command", "check"):
        where, what = (
            loc,
            (
                f"{_shown(value)} is not a list of arguments; write it as an argv "
                "list, e.g. [python, server.py]"
            ),
        )
    else:
        where, what = loc, f"{_shown(value)} is not valid: {err['msg'][:1].lower()}{err['msg'][1:]}"
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
