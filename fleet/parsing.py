"""PARSE and REVIEW: agent output → validated Tasks (marker block, LLM extraction, ISSUE lines).

Outputs can be 100 MB: nothing here copies or splits the whole text. Regexes find the few
places that matter (markers, ISSUE line starts, the issues JSON) at C speed, and only those
places are sliced, cleaned of terminal noise and read in Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain
from typing import Any

from pydantic import BaseModel, ValidationError

from fleet.clients.base import Extractor
from fleet.models import MAX_DESCRIPTION, SEVERITY_PRIORITY, Task, validate_app_id

TASKS_START = "<!-- EVOLUTION_TASKS_START -->"
TASKS_END = "<!-- EVOLUTION_TASKS_END -->"

# Safety bounds against hostile output, not pipeline thresholds: the largest JSON text we
# hand to the decoder, how many per-item reasons a result keeps, how long one reason may be.
MAX_BLOCK_CHARS = 2_000_000
MAX_REASONS = 20
MAX_REASON_CHARS = 240
# How much of one ISSUE line is read: descriptions are cut to MAX_DESCRIPTION anyway.
MAX_LINE_CHARS = 65_536
# How many lines after an ISSUE header are looked at for its FILE/SEVERITY/FIX lines.
MAX_BLOCK_LINES = 8
# Items validated per task kept at most: a flood of duplicates or invalid items costs a
# bounded amount of work, the rest are counted.
EXAMINE_FACTOR = 10

NO_EXTRACTOR = "no structured block and no extractor configured"

# Models vary the spacing and case of the markers; the words themselves are the contract.
_MARKER_RE = re.compile(r"<!--[ \t]*EVOLUTION_TASKS_(START|END)[ \t]*-->", re.IGNORECASE)
# ANSI escape sequences (terminal captures) and control characters other than \t \n \r.
# The character classes are disjoint, so matching is linear.
_NOISE = r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
_NOISE_RE = re.compile(_NOISE)
_BLANK_RE = re.compile(rf"(?:\s|{_NOISE})*+")
_ISSUES_JSON_RE = re.compile(r'\{\s*"issues"\s*:')
_COLON_RE = re.compile(r"[ \t*_]*:")
_NUMBERED_RE = re.compile(r"\d{1,4}[.)]")
_DECORATION = " \t-*+•>#_`|"
# Line breaks as str.splitlines() sees them once the noise above is gone.
_BREAK_RE = re.compile(r"\r\n|[\n\r\x85\u2028\u2029]")
# Where an ISSUE line may start: decoration, a list number and terminal noise, then the word.
# Possessive repeats over disjoint classes: one pass per line start, no backtracking.
_LEAD = rf"(?:[ \t\-*+•>#_`|]|{_NOISE})*+(?:\d{{1,4}}[.)](?:[ \t\-*+•>#_`|]|{_NOISE})*+)?"
_ISSUE_AT_START_RE = re.compile(rf"{_LEAD}issue", re.IGNORECASE)
_ISSUE_AFTER_BREAK_RE = re.compile(rf"[\n\r\x85\u2028\u2029]{_LEAD}issue", re.IGNORECASE)
# Counting mode (past the cap): an ISSUE line with FILE: near its start, or an ISSUE header
# whose next line is a FILE/SEVERITY/FIX line. Counted, not parsed.
_BREAKS = r"\n\r\x85\u2028\u2029"
_COUNTED = (
    rf"{_LEAD}issue(?:[^{_BREAKS}]{{0,31}}?(?<=[ \t*_`|:(\[])file[ \t*_]*:"
    rf"|[^{_BREAKS}]*+(?:\r\n|[{_BREAKS}])[ \t\-*+•>#_`|]*(?:file|severity|fix)[ \t*_]*:)"
)
_COUNTED_RE = re.compile(_COUNTED, re.IGNORECASE)
_COUNTED_AFTER_BREAK_RE = re.compile(rf"[{_BREAKS}]{_COUNTED}", re.IGNORECASE)
_WHITESPACE_RE = re.compile(r"\s*")
_TASKS_ARRAY_RE = re.compile(r'\{\s*"tasks"\s*:\s*\[')
_FIELD_WORDS = ("file", "severity", "fix")
_KEYWORD_BEFORE = " \t*_`|:(["
_NO_FILE = frozenset({"", "-", "—", "n/a", "na", "none", "null", "general"})
_JSON = json.JSONDecoder(strict=False)  # models put raw newlines/tabs inside strings


class ParseResult(list[Task]):
    """The tasks parsed from one output, plus which tier produced them and what was dropped.

    tier: "block" (marker JSON), "extractor" (LLM tier 2 was asked), "none" (nothing usable
    and no tier 2), "review" (adversarial review). dropped: a reason for every item or blob
    that was not kept, the first MAX_REASONS item reasons then "... and N more".
    """

    def __init__(self, tasks: Iterable[Task] = (), *, tier: str, dropped: Iterable[str] = ()):
        super().__init__(tasks)
        self.tier = tier
        self.dropped = list(dropped)

    def __repr__(self) -> str:
        return f"ParseResult(tier={self.tier!r}, tasks={list(self)!r}, dropped={self.dropped!r})"


def insufficient(result: ParseResult, floor: int = 3) -> bool:
    """The quality floor of PARSE: fewer than `floor` tasks means retry the skill (seed 002)."""
    return len(result) < floor


def parse_skill_output(
    output: str,
    app_id: str,
    extractor: Extractor | None = None,
    *,
    max_tasks: int = 500,
) -> ParseResult:
    """PARSE (seed 002 §2): tier 1 is the JSON between the markers, tier 2 the extractor.

    Tier 2 runs only when tier 1 has no complete block, an unusable one, or no valid task in
    it. Hostile output (any type, any size, broken JSON) never raises: what was not kept is
    in `dropped`. An invalid `app_id` or `max_tasks` is the caller's bug and raises
    InvalidAppId / ValueError before anything is read.
    """
    app_id = validate_app_id(app_id)
    _check_cap(max_tasks)
    reasons = _Reasons()
    text = _as_text(output, reasons)
    if text is None:
        return ParseResult(tier="none", dropped=reasons.done())

    items = _block_items(text, reasons)
    if items is not None:
        tasks = _collect(items, "block", app_id, "skill", max_tasks, reasons)
        if tasks:
            return ParseResult(tasks, tier="block", dropped=reasons.done())
        reasons.note("structured block yielded no valid tasks")

    if extractor is None:
        reasons.note(NO_EXTRACTOR)
        return ParseResult(tier="none", dropped=reasons.done())
    try:
        extracted = extractor.extract(_cleaned(text), app_id)
    except Exception as exc:  # tier 2 is an LLM over the network: its failure is data here
        reasons.note(f"extractor failed: {_describe(exc)}")
        return ParseResult(tier="extractor", dropped=reasons.done())
    items = _as_items(extracted, "extractor result", reasons)
    tasks = _collect(items or [], "extractor", app_id, "skill", max_tasks, reasons)
    if not tasks:
        reasons.note("extractor returned no valid tasks")
    return ParseResult(tasks, tier="extractor", dropped=reasons.done())


def parse_review_output(review: str, app_id: str, *, max_tasks: int = 500) -> ParseResult:
    """REVIEW (seed 002 §3): ISSUE lines plus the trailing {"issues": [...]} JSON, merged.

    Tasks are `adversarial`, with severity and the priority SEVERITY_PRIORITY gives it; the
    same file + description (case/whitespace-insensitive) from both forms is kept once.
    Raises InvalidAppId / ValueError only for the caller's arguments, never for the text.
    """
    app_id = validate_app_id(app_id)
    _check_cap(max_tasks)
    reasons = _Reasons()
    text = _as_text(review, reasons)
    if text is None:
        return ParseResult(tier="review", dropped=reasons.done())

    json_items = _issues_json(text, reasons)
    budget = _Budget()
    lines = _issue_lines(text, budget)
    first = next(lines, None)  # the rest stay lazy: a 100 MB review is never held as lines
    line_items = chain([first], lines) if first is not None else iter(())
    json_labelled = ((f"issues[{n}]", item) for n, item in enumerate(json_items or []))
    candidates = chain(line_items, json_labelled)
    tasks = _collect_labelled(
        candidates, app_id, "adversarial", max_tasks, reasons, "issues", budget
    )
    if first is None and json_items is None:
        reasons.note('no ISSUE lines and no {"issues": [...]} JSON in the review')
    return ParseResult(tasks, tier="review", dropped=reasons.done())


# --- reasons -----------------------------------------------------------------------------


class _Reasons:
    """Collects why things were dropped: tier-level notes always, item reasons bounded."""

    def __init__(self) -> None:
        self._notes: list[str] = []
        self._items: list[str] = []
        self._more = 0

    def note(self, reason: str) -> None:
        self._notes.append(_short(reason))

    def item(self, reason: str) -> None:
        if len(self._items) < MAX_REASONS:
            self._items.append(_short(reason))
        else:
            self._more += 1

    def done(self) -> list[str]:
        tail = [f"... and {self._more} more"] if self._more else []
        return self._notes + self._items + tail


def _short(reason: str) -> str:
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 1] + "…"


def _describe(exc: BaseException) -> str:
    try:
        message = str(exc)
    except Exception:  # a hostile __str__ must not escape either
        message = ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _check_cap(max_tasks: int) -> None:
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1:
        raise ValueError(f"max_tasks must be a positive integer, got {max_tasks!r}")


# --- text --------------------------------------------------------------------------------


def _as_text(output: object, reasons: _Reasons) -> str | None:
    """The output as clean text, or None (with a note) when there is nothing to parse."""
    if output is None:
        reasons.note("output is None: the agent returned nothing")
        return None
    if isinstance(output, (bytes, bytearray)):
        output = bytes(output).decode("utf-8", errors="replace")
    if not isinstance(output, str):
        reasons.note(f"output is a {type(output).__name__}, not text")
        return None
    if _BLANK_RE.fullmatch(output):  # stops at the first visible character
        reasons.note("output is empty")
        return None
    return output


def _cleaned(text: str) -> str:
    """`text` without terminal noise; the same object (no copy) when there is none."""
    return _NOISE_RE.sub("", text)


def _clean(value: object) -> object:
    """Descriptions from JSON can carry escaped control characters; fit them to the limit."""
    if not isinstance(value, str):
        return value
    return _fit(" ".join(_NOISE_RE.sub("", value).split()))


def _fit(text: str, limit: int = MAX_DESCRIPTION) -> str:
    """Truncate at a word boundary (keeping the ellipsis inside the limit) rather than drop."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    space = cut.rfind(" ")
    if space >= limit // 2:  # one giant word: a hard cut beats losing most of the sentence
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + "…"


# --- tier 1: the marker block --------------------------------------------------------------


def _last_block(text: str) -> tuple[tuple[int, int] | None, bool]:
    """Span of the last complete START..END pair, and whether a START was left open."""
    span = None
    opened = None
    for marker in _MARKER_RE.finditer(text):
        if marker.group(1).upper() == "START":
            opened = marker.end()  # nested START: the innermost one starts the block
        elif opened is not None:
            span = (opened, marker.start())
            opened = None
    return span, opened is not None


def _block_items(text: str, reasons: _Reasons) -> list | None:
    """Items of the tier-1 block, or None with a note saying why there are none."""
    span, dangling = _last_block(text)
    if span is None:
        reasons.note(
            "structured block start marker has no end marker (output truncated?)"
            if dangling
            else "no structured block (EVOLUTION_TASKS_START/END markers) in the output"
        )
        return None
    if dangling:
        reasons.note("a later start marker has no end marker; used the last complete block")
    start, end = span
    body = _cleaned(text[start : min(end, start + MAX_BLOCK_CHARS)])
    if end - start > MAX_BLOCK_CHARS:
        items = _leading_items(body)
        over = f"structured block is {end - start} characters, over the {MAX_BLOCK_CHARS} parsed"
        if not items:
            reasons.note(over)
            return None
        reasons.note(
            f"{over}: kept the {len(items)} items before that point, the rest were not read"
        )
        return items
    value = _decode(body, "structured block", reasons)
    if value is _INVALID:
        return None
    return _as_items(value, "structured block", reasons)


def _leading_items(body: str) -> list:
    """The complete items at the start of a JSON array (or {"tasks": [...]}) cut short:
    each is decoded on its own, so a cut through the array loses only the items after it."""
    first = min((i for i in (body.find("["), body.find("{")) if i >= 0), default=-1)
    if first < 0:
        return []
    if body[first] == "[":
        pos = first + 1
    else:
        opening = _TASKS_ARRAY_RE.match(body, first)
        if opening is None:
            return []
        pos = opening.end()
    items: list = []
    while True:
        pos = _past_space(body, pos)
        try:
            item, pos = _JSON.raw_decode(body, pos)
        except (ValueError, RecursionError):  # the cut, or a broken item: stop there
            return items
        items.append(item)
        pos = _past_space(body, pos)
        if body[pos : pos + 1] != ",":
            return items
        pos += 1


def _past_space(body: str, pos: int) -> int:
    """`pos` moved past the whitespace there."""
    match = _WHITESPACE_RE.match(body, pos)
    assert match is not None  # `\s*` matches everywhere, if only the empty string
    return match.end()


_INVALID = object()


def _decode(body: str, what: str, reasons: _Reasons) -> Any:
    """The first JSON value in `body` (fences and prose around it are ignored)."""
    starts = [i for i in (body.find("["), body.find("{")) if i >= 0]
    if not starts:
        reasons.note(f"{what} holds no JSON")
        return _INVALID
    try:
        value, _ = _JSON.raw_decode(body, min(starts))
    except RecursionError:
        reasons.note(f"{what} JSON nests too deeply to parse")
        return _INVALID
    except json.JSONDecodeError as exc:
        reasons.note(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
        return _INVALID
    except ValueError as exc:  # e.g. an integer over the interpreter's digit limit
        reasons.note(f"{what} is not usable JSON: {_describe(exc)}")
        return _INVALID
    return value


def _as_items(value: object, what: str, reasons: _Reasons) -> list | None:
    """A JSON array of tasks, or the list under {"tasks": [...]}."""
    if isinstance(value, Mapping) and isinstance(value.get("tasks"), (list, tuple)):
        value = value["tasks"]
    if isinstance(value, (list, tuple)):
        return list(value)
    shape = (
        'an object without a "tasks" list'
        if isinstance(value, Mapping)
        else (f"a {type(value).__name__}")
    )
    reasons.note(f'{what} is {shape}; expected an array of tasks or {{"tasks": [...]}}')
    return None


# --- review: ISSUE lines and the issues JSON ------------------------------------------------


class _Malformed(str):
    """Why a line that starts like an ISSUE is not one (kept apart from str items in JSON)."""


def _keyword(low: str, word: str, start: int) -> tuple[int, int] | None:
    """(start of `word`, start of its value) for the first `word:` at a word start, else None."""
    i = low.find(word, start)
    while i >= 0:
        after = _COLON_RE.match(low, i + len(word))
        if after and (i == 0 or low[i - 1] in _KEYWORD_BEFORE):
            return i, after.end()
        i = low.find(word, i + len(word))
    return None


def _issue_fields(line: str) -> dict | _Malformed | None:
    """Fields of one `ISSUE FILE: … SEVERITY: … FIX: …` line; a reason when it is malformed;
    None when the line is not an ISSUE line. Plain find() scans: linear on any line."""
    s = line.lstrip(_DECORATION)
    numbered = _NUMBERED_RE.match(s)
    if numbered:
        s = s[numbered.end() :].lstrip(_DECORATION)
    if s[:5].lower() != "issue":
        return None
    low = s.lower()
    file_kw = _keyword(low[:40], "file", 5)
    if file_kw is None:
        return None
    severity_kw = _keyword(low, "severity", file_kw[1])
    if severity_kw is None:
        return _Malformed("no SEVERITY: after FILE:")
    fix_kw = _keyword(low, "fix", severity_kw[1])
    if fix_kw is None:
        return _Malformed("no FIX: after SEVERITY:")
    file = s[file_kw[1] : severity_kw[0]].strip(" \t*_`'\"")
    return {
        "file": None if file.lower() in _NO_FILE else file,
        "severity": s[severity_kw[1] : fix_kw[0]].strip(" \t*_`'\"[](),.;").lower(),
        "description": s[fix_kw[1] :].lstrip(" \t*_").rstrip(" \t*"),
    }


class _Lines:
    """Reads lines of a large text by position, without splitting it: a line is sliced
    (at most MAX_LINE_CHARS of it) and cleaned only when asked for, and line numbers are
    kept by counting the breaks skipped over."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0  # where the next unread line starts
        self.number = 1  # its 1-based number

    def skip_to(self, start: int) -> None:
        """Move to `start`, the start of a later line."""
        self.number += _breaks(self.text, self.pos, start)
        self.pos = start

    def read(self) -> str | None:
        """The next line, cleaned, or None at the end of the text."""
        if self.pos >= len(self.text):
            return None
        found = _BREAK_RE.search(self.text, self.pos)
        end, after = (found.start(), found.end()) if found else (len(self.text), len(self.text))
        line = self.text[self.pos : min(end, self.pos + MAX_LINE_CHARS)]
        self.pos, self.number = after, self.number + 1
        return _cleaned(line)

    def mark(self) -> tuple[int, int]:
        return self.pos, self.number

    def back_to(self, mark: tuple[int, int]) -> None:
        self.pos, self.number = mark


def _breaks(text: str, start: int, end: int) -> int:
    """Line breaks in text[start:end], as splitlines() counts them (\r\n is one)."""
    count = text.count
    return (
        count("\n", start, end)
        + count("\r", start, end)
        - count("\r\n", start, end)
        + count("\x85", start, end)
        + count("\u2028", start, end)
        + count("\u2029", start, end)
    )


def _issue_starts(text: str) -> Iterator[int]:
    """Offsets of the lines that start with ISSUE (after decoration), in order."""
    if _ISSUE_AT_START_RE.match(text):
        yield 0
    for found in _ISSUE_AFTER_BREAK_RE.finditer(text):
        yield found.start() + 1


def _is_issue_start(line: str) -> bool:
    return _ISSUE_AT_START_RE.match(line) is not None


class _Budget:
    """Spent once the collector keeps nothing more: the ISSUE reader then only counts."""

    spent = False


class _Counted(int):
    """How many ISSUE lines were counted, not read, once the budget was spent."""


def _issue_lines(text: str, budget: _Budget) -> Iterator[tuple[str, dict | _Malformed | int]]:
    """ISSUE lines in order, in three layouts: one line (`ISSUE FILE: … SEVERITY: … FIX: …`),
    one line split over up to 4 (joined), and a block: an `ISSUE …` header line followed by
    `FILE:`, `SEVERITY:` and `FIX:` lines in any order (FILE may be left out). Once the
    budget is spent, the ISSUE lines left are counted in one pass: ("", _Counted(n))."""
    lines = _Lines(text)
    for start in _issue_starts(text):
        if start < lines.pos:  # inside a block already read
            continue
        if budget.spent:
            here = 1 if _COUNTED_RE.match(text, start) else 0
            rest = sum(1 for _ in _COUNTED_AFTER_BREAK_RE.finditer(text, start))
            yield "", _Counted(here + rest)
            return
        lines.skip_to(start)
        where = f"ISSUE line {lines.number}"
        header = lines.read()
        assert header is not None  # `start` is inside the text
        fields = _issue_fields(header)
        if isinstance(fields, _Malformed):
            fields = _joined_issue(header, lines) or fields
        elif fields is None:
            fields = _issue_block(lines)
        if fields is not None:
            yield where, fields


def _joined_issue(header: str, lines: _Lines) -> dict | None:
    """An ISSUE line whose SEVERITY/FIX went onto the next lines (up to 3), joined."""
    joined, after_header = header, lines.mark()
    for _ in range(3):
        nxt = lines.read()
        if nxt is None or not nxt.strip() or _is_issue_start(nxt.strip()):
            break
        joined = f"{joined} {nxt.strip()}"
        attempt = _issue_fields(joined)
        if isinstance(attempt, dict):
            return attempt
    lines.back_to(after_header)  # not joined: the lines after it are read on their own
    return None


def _issue_block(lines: _Lines) -> dict | _Malformed | None:
    """After an `ISSUE …` header without FILE: its FILE/SEVERITY/FIX lines; None (and
    nothing read) when the next line is not one of them: the header was just prose."""
    found: dict[str, str] = {}
    kept = lines.mark()
    for _ in range(MAX_BLOCK_LINES):
        mark = lines.mark()
        line = lines.read()
        if line is None:
            break
        if not line.strip():
            continue
        field = _field_line(line)
        if field is None or field[0] in found:
            lines.back_to(mark)
            break
        found[field[0]] = field[1]
        kept = lines.mark()
        if len(found) == len(_FIELD_WORDS):
            break
    lines.back_to(kept)  # blank lines after the last field are not the block's
    if not found:
        return None
    for word in ("severity", "fix"):
        if word not in found:
            return _Malformed(f"ISSUE block has no {word.upper()}: line")
    file = found.get("file", "").strip(" \t*_`'\"")
    return {
        "file": None if file.lower() in _NO_FILE else file,
        "severity": found["severity"].strip(" \t*_`'\"[](),.;").lower(),
        "description": found["fix"].lstrip(" \t*_").rstrip(" \t*"),
    }


def _field_line(line: str) -> tuple[str, str] | None:
    """("file" | "severity" | "fix", value) of a `- **File:** x` line, else None."""
    s = line.lstrip(_DECORATION)
    low = s[:12].lower()
    for word in _FIELD_WORDS:
        if low.startswith(word):
            colon = _COLON_RE.match(low, len(word))
            if colon:
                return word, s[colon.end() :]
    return None


def _issues_json(text: str, reasons: _Reasons) -> list | None:
    """Items of the last `{"issues": [...]}` in the review: None when there is none, [] (with
    a note) when it is broken."""
    last = None
    for found in _ISSUES_JSON_RE.finditer(text):
        last = found
    if last is None:
        return None
    start = last.start()
    body = _cleaned(text[start : start + MAX_BLOCK_CHARS])
    try:
        value, _ = _JSON.raw_decode(body)
    except RecursionError:
        reasons.note("issues JSON nests too deeply to parse")
        return []
    except ValueError as exc:
        if len(text) - start > MAX_BLOCK_CHARS:
            reasons.note(f"issues JSON is not valid within the first {MAX_BLOCK_CHARS} characters")
        elif isinstance(exc, json.JSONDecodeError):
            where = f"line {exc.lineno} column {exc.colno}"
            reasons.note(f"issues JSON is not valid: {exc.msg} at {where}")
        else:
            reasons.note(f"issues JSON is not usable: {_describe(exc)}")
        return []
    issues = value.get("issues")
    if not isinstance(issues, list):
        reasons.note(f'"issues" is a {type(issues).__name__}, expected a list')
        return []
    return issues


# --- validation, de-duplication, cap -------------------------------------------------------


class _Reject(ValueError):
    """An item that cannot become a Task; the message is the reason."""


def _priority(value: object, severity: object) -> object:
    """Coerce int-like priorities ("2", " P1 ", 2.0); leave the rest for the schema to reject."""
    if value is None:
        return SEVERITY_PRIORITY.get(severity) if isinstance(severity, str) else None
    if isinstance(value, bool):
        raise _Reject("priority: expected an integer 1-5, got a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("p").strip()
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return value
            return int(number) if number.is_integer() else value
    return value


def _task(item: object, app_id: str, source: str) -> Task:
    if isinstance(item, BaseModel):
        item = item.model_dump()
    if not isinstance(item, Mapping):
        raise _Reject(f"expected an object, got {type(item).__name__}")
    description = item.get("description")
    if description is None and source == "adversarial":
        description = item.get("fix")
    severity = item.get("severity")
    if isinstance(severity, str):
        severity = severity.strip().lower() or None
    if source == "adversarial":
        if severity not in SEVERITY_PRIORITY:
            raise _Reject(f"severity {severity!r:.40} is not one of critical|high|medium|low")
        priority: object = SEVERITY_PRIORITY[severity]
    else:
        priority = _priority(item.get("priority"), severity)
    file = item.get("file")
    if isinstance(file, str) and file.strip().lower() in _NO_FILE:
        file = None
    data = {
        "description": _clean(description),
        "severity": severity,
        "file": file,
        "priority": priority,
    }
    data = {k: v for k, v in data.items() if v is not None}
    # app_id and source are ours, whatever the text claims.
    return Task.model_validate({**data, "app_id": app_id, "source": source})


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors(include_input=False, include_url=False)
    if not errors:
        return "invalid task"
    first = errors[0]
    loc = ".".join(str(part) for part in first.get("loc", ())) or "task"
    return f"{loc}: {first.get('msg', 'invalid')}"


def _collect(
    items: Iterable, label: str, app_id: str, source: str, max_tasks: int, reasons: _Reasons
) -> list[Task]:
    labelled = ((f"{label}[{n}]", item) for n, item in enumerate(items))
    return _collect_labelled(labelled, app_id, source, max_tasks, reasons, "tasks")


def _collect_labelled(
    candidates: Iterable[tuple[str, Any]],
    app_id: str,
    source: str,
    max_tasks: int,
    reasons: _Reasons,
    noun: str,
    budget: _Budget | None = None,
) -> list[Task]:
    """Validate, de-duplicate by Task.key and cap; every item not kept gets a reason.

    At most EXAMINE_FACTOR × max_tasks items are validated; past that, or past the cap,
    items are only counted (and `budget` is spent, so the source may count cheaply).
    """
    budget = budget or _Budget()
    tasks: list[Task] = []
    index: dict[str, int] = {}
    over = examined = 0
    limit = EXAMINE_FACTOR * max_tasks
    for where, item in candidates:
        if len(tasks) >= max_tasks or examined >= limit:
            budget.spent = True
            over += item if isinstance(item, _Counted) else 1  # counted, never validated
            continue
        examined += 1
        if isinstance(item, _Malformed):  # an ISSUE line without its fields, already explained
            reasons.item(f"{where}: {item}")
            continue
        try:
            task = _task(item, app_id, source)
        except _Reject as exc:
            reasons.item(f"{where}: {exc}")
            continue
        except ValidationError as exc:
            reasons.item(f"{where}: {_first_error(exc)}")
            continue
        except Exception as exc:  # hostile mappings (odd __getitem__, deep nesting) stay data
            reasons.item(f"{where}: unusable item ({_describe(exc)})")
            continue
        seen = index.get(task.key)
        if seen is None:
            index[task.key] = len(tasks)
            tasks.append(task)
            continue
        kept = tasks[seen]
        if task.priority < kept.priority:  # the same finding, read as more urgent elsewhere
            tasks[seen] = kept.model_copy(
                update={"priority": task.priority, "severity": task.severity or kept.severity}
            )
        reasons.item(f"{where}: duplicate of an earlier task (same file and description)")
    if over and len(tasks) < max_tasks:
        reasons.note(
            f"{over} {noun} after the first {limit} examined were not read "
            "(too many duplicate or invalid ones before them)"
        )
    elif over:
        reasons.note(f"{over} {noun} beyond the cap of {max_tasks} were not kept")
    return tasks


# --- usage: COST / TOKENS lines ----------------------------------------------------------
# An agent may report what its task cost on lines of their own, anywhere in its output:
#   COST: $0.42            TOKENS: in=12,345 out=678        ACCOUNT: team-max-2
# The last report of each kind wins (agents print running totals). Bounds against hostile
# output, not prices: a line longer than MAX_USAGE_LINE is not a report, and a value beyond
# MAX_COST_USD / MAX_TOKENS (or not finite) is dropped with its reason.
MAX_USAGE_LINE = 256
MAX_COST_USD = 1_000_000.0
MAX_TOKENS = 10**12

_USAGE_LEAD = r"[ \t>*_`|-]*"
_COUNT = r"(?:\d{1,3}(?:,\d{3}){1,6}|\d{1,19})"
_END = r"[ \t*_`]*\r?$"
# One pattern for the three kinds, so a line costs one attempt whatever it holds.
_REPORT = (
    rf"{_USAGE_LEAD}(?:"
    rf"COST[ \t*_]*:[ \t]*(?:\$[ \t]*)?(?P<cost>\d{{1,12}}(?:\.\d{{1,12}})?)[ \t]*(?:USD)?{_END}"
    rf"|(?P<tokens>TOKENS)[ \t*_]*:[ \t]*(?:in(?:put)?[ \t]*=[ \t]*(?P<tin>{_COUNT}))?[ \t,;]*"
    rf"(?:out(?:put)?[ \t]*=[ \t]*(?P<tout>{_COUNT}))?{_END}"
    rf"|ACCOUNT[ \t*_]*:[ \t]*(?P<account>[A-Za-z0-9@._:+-]{{1,64}}){_END})"
)
_FLAGS = re.IGNORECASE | re.MULTILINE
# At a region's first line, and after a line break: the second starts with a literal line
# break, which the regex engine finds at C speed (a `^` would be tried at every character).
_REPORT_AT_START_RE = re.compile(_REPORT, _FLAGS)
_REPORT_AFTER_BREAK_RE = re.compile("\n" + _REPORT, _FLAGS)


class Usage(BaseModel):
    """What an agent said its task cost; None where it did not say."""

    tokens_in: int | None = None
    tokens_out: int | None = None
    cost_usd: float | None = None
    account: str | None = None  # `ACCOUNT: name` — the login or key name, never a secret
    dropped: list[str] = []

    @property
    def reported(self) -> bool:
        return (self.tokens_in, self.tokens_out, self.cost_usd) != (None, None, None)


class UsageMeter:
    """Reads COST/TOKENS lines from output fed in chunks of any size (a report split across
    chunks still counts). Memory is bounded by MAX_USAGE_LINE whatever the output's size;
    nothing here copies a chunk."""

    def __init__(self) -> None:
        self._tail = ""  # the unfinished last line, at most MAX_USAGE_LINE characters
        self._skipping = False  # inside a line already too long to be a report
        self._usage = Usage()
        self._reasons = _Reasons()

    def feed(self, chunk: str) -> None:
        first = chunk.find("\n")
        if first < 0:
            self._keep(chunk)
            return
        if not self._skipping and len(self._tail) + first <= MAX_USAGE_LINE:
            line = self._tail + chunk[: first + 1]
            self._scan(line, 0, len(line))
        self._tail, self._skipping = "", False
        last = chunk.rfind("\n")
        if last > first:
            self._scan(chunk, first + 1, last + 1)
        self._keep(chunk[last + 1 : last + 2 + MAX_USAGE_LINE])

    def usage(self) -> Usage:
        """The usage reported so far (the unfinished last line counts as a whole one)."""
        if self._tail and not self._skipping:
            self._scan(self._tail, 0, len(self._tail))
            self._tail = ""
        return self._usage.model_copy(update={"dropped": self._reasons.done()})

    def _keep(self, rest: str) -> None:
        if self._skipping:
            return
        if len(self._tail) + len(rest) > MAX_USAGE_LINE:
            self._tail, self._skipping = "", True
        else:
            self._tail += rest

    def _scan(self, text: str, start: int, end: int) -> None:
        """Read the reports in text[start:end], which begins at a line start, in order."""
        first = _REPORT_AT_START_RE.match(text, start, end)
        found = _REPORT_AFTER_BREAK_RE.finditer(text, start, end)
        for match in chain([first] if first else [], found):
            self._read(match)

    def _read(self, match: re.Match[str]) -> None:
        if (cost := match.group("cost")) is not None:
            if float(cost) > MAX_COST_USD:
                self._reasons.item(f"COST {cost} is beyond {MAX_COST_USD:g} USD")
            else:
                self._usage.cost_usd = float(cost)
        elif match.group("account") is not None:
            self._usage.account = match.group("account")
        elif match.group("tokens") is not None:
            counts = [_count(match.group("tin")), _count(match.group("tout"))]
            if counts == [None, None]:
                self._reasons.item("TOKENS line without in= or out=")
            elif any(c is not None and c > MAX_TOKENS for c in counts):
                self._reasons.item(f"TOKENS beyond {MAX_TOKENS} on one line")
            else:
                u = self._usage
                u.tokens_in = counts[0] if counts[0] is not None else u.tokens_in
                u.tokens_out = counts[1] if counts[1] is not None else u.tokens_out


def _count(text: str | None) -> int | None:
    return int(text.replace(",", "")) if text else None


def parse_usage(output: object) -> Usage:
    """The COST/TOKENS report of one agent output (any size); an empty Usage if none."""
    meter = UsageMeter()
    if isinstance(output, (bytes, bytearray)):
        output = bytes(output).decode("utf-8", errors="replace")
    if isinstance(output, str):
        meter.feed(output)
    return meter.usage()
