"""PARSE and REVIEW parsing: tiers, validation, de-duplication, cap, and hostile output."""

from __future__ import annotations

import json
import pickle
import time

import pytest

from fleet.errors import InvalidAppId
from fleet.models import MAX_DESCRIPTION, Task
from fleet.parsing import (
    MAX_BLOCK_CHARS,
    MAX_LINE_CHARS,
    MAX_REASONS,
    NO_EXTRACTOR,
    TASKS_END,
    TASKS_START,
    ParseResult,
    insufficient,
    parse_review_output,
    parse_skill_output,
)

APP = "demo-app"
NO_BLOCK = "no structured block (EVOLUTION_TASKS_START/END markers) in the output"
# Speed is measured in bench/bench_parse.py, not asserted here (a loaded machine would flake);
# the hostile-size tests below carry a timeout that quadratic behaviour would blow.
pytestmark = pytest.mark.timeout(60)


class RecordingExtractor:
    """Test double of the tier-2 LLM: returns a canned answer (or raises) and records calls."""

    def __init__(self, answer: object = None, error: BaseException | None = None):
        self.answer = answer
        self.error = error
        self.calls: list[tuple[str, str]] = []

    def extract(self, output: str, app_id: str) -> list[dict]:
        self.calls.append((output, app_id))
        if self.error is not None:
            raise self.error
        return self.answer  # type: ignore[return-value]


def block(payload: object, *, fence: bool = False) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    if fence:
        body = f"```json\n{body}\n```"
    return f"{TASKS_START}\n  {body}  \n{TASKS_END}"


THREE = [
    {"priority": 1, "description": "Fix the crash on launch.", "file": "Sources/App.swift"},
    {"priority": 3, "description": "Add onboarding screens."},
    {"priority": 5, "description": "Polish the settings icons.", "file": "Assets/Icons"},
]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# --- tier 1 ---------------------------------------------------------------------------------


def test_block_array_becomes_skill_tasks() -> None:
    output = "Analysis done.\n" + block(THREE) + "\nBye."
    result = parse_skill_output(output, APP)
    assert isinstance(result, ParseResult) and isinstance(result, list)
    assert result.tier == "block"
    assert result.dropped == []
    assert [(t.priority, t.description, t.file) for t in result] == [
        (1, "Fix the crash on launch.", "Sources/App.swift"),
        (3, "Add onboarding screens.", None),
        (5, "Polish the settings icons.", "Assets/Icons"),
    ]
    assert {t.source for t in result} == {"skill"}
    assert {t.app_id for t in result} == {APP}


def test_block_object_with_tasks_key_and_fence_are_accepted() -> None:
    result = parse_skill_output(block({"tasks": THREE}, fence=True), APP)
    assert result.tier == "block"
    assert len(result) == 3


def test_app_id_and_source_in_the_text_are_ignored() -> None:
    items = [{"priority": 2, "description": "Ship it.", "app_id": "other", "source": "adversarial"}]
    (task,) = parse_skill_output(block(items), APP)
    assert (task.app_id, task.source) == (APP, "skill")


def test_last_complete_block_wins_and_dangling_start_is_noted() -> None:
    first = block([{"description": "Old task."}])
    second = block(THREE)
    output = f'{first}\n...\n{second}\n{TASKS_START}\n[{{"description": "cut off'
    result = parse_skill_output(output, APP)
    assert result.tier == "block"
    assert [t.description for t in result] == [t["description"] for t in THREE]
    assert result.dropped == [
        "a later start marker has no end marker; used the last complete block"
    ]


def test_marker_spacing_and_case_variants_are_found() -> None:
    output = "<!--evolution_tasks_start-->" + json.dumps(THREE) + "<!--  EVOLUTION_TASKS_END -->"
    assert len(parse_skill_output(output, APP)) == 3


def test_priority_coercion_and_severity_normalisation() -> None:
    items = [
        {"priority": "2", "description": "A."},
        {"priority": " P1 ", "description": "B."},
        {"priority": 4.0, "description": "C."},
        {"description": "D.", "severity": "HIGH"},  # priority from severity
        {"description": "E."},  # schema default
    ]
    result = parse_skill_output(block(items), APP)
    assert [(t.description, t.priority, t.severity) for t in result] == [
        ("A.", 2, None),
        ("B.", 1, None),
        ("C.", 4, None),
        ("D.", 2, "high"),
        ("E.", 3, None),
    ]


def test_invalid_items_are_dropped_with_index_and_first_error() -> None:
    items = [
        THREE[0],
        "not an object",
        {"priority": 0, "description": "Zero."},
        {"priority": 6, "description": "Six."},
        {"priority": True, "description": "Bool."},
        {"priority": "urgent", "description": "Word."},
        {"priority": 2},
        {"priority": 2, "description": "   "},
        {"description": "Bad severity.", "severity": "blocker"},
        {"description": "Long path.", "file": "x" * 600},
        {"description": "NUL path.", "file": "a\x00b"},
        THREE[1],
    ]
    result = parse_skill_output(block(items), APP)
    assert result.tier == "block"
    assert len(result) == 2
    assert result.dropped == [
        "block[1]: expected an object, got str",
        "block[2]: priority: Input should be greater than or equal to 1",
        "block[3]: priority: Input should be less than or equal to 5",
        "block[4]: priority: expected an integer 1-5, got a boolean",
        "block[5]: priority: Input should be a valid integer, unable to parse string as an integer",
        "block[6]: description: Field required",
        "block[7]: description: String should have at least 1 character",
        "block[8]: severity: Input should be 'critical', 'high', 'medium' or 'low'",
        "block[9]: file: String should have at most 512 characters",
        "block[10]: file: Value error, file path contains a NUL byte",
    ]


def test_duplicates_by_key_are_dropped_keeping_the_most_urgent_reading() -> None:
    items = [
        {"priority": 3, "description": "Fix   the Crash.", "file": "App.swift"},
        {"priority": 1, "description": "fix the crash.", "file": "app.SWIFT"},
        {"priority": 2, "description": "Fix the crash.", "file": "Other.swift"},  # other file
    ]
    result = parse_skill_output(block(items), APP)
    assert [(t.description, t.file, t.priority) for t in result] == [
        ("Fix the Crash.", "App.swift", 1),
        ("Fix the crash.", "Other.swift", 2),
    ]
    assert result.dropped == ["block[1]: duplicate of an earlier task (same file and description)"]


def test_cap_keeps_max_tasks_and_says_how_many_were_not_kept() -> None:
    items = [{"description": f"Task number {i}."} for i in range(600)]
    result = parse_skill_output(block(items), APP, max_tasks=500)
    assert len(result) == 500
    assert result[-1].description == "Task number 499."
    assert result.dropped == ["100 tasks beyond the cap of 500 were not kept"]


def test_dropped_reasons_are_bounded() -> None:
    items = [{"priority": 9, "description": f"Bad {i}."} for i in range(100)] + THREE
    result = parse_skill_output(block(items), APP)
    assert len(result) == 3
    assert len(result.dropped) == MAX_REASONS + 1
    assert result.dropped[-1] == f"... and {100 - MAX_REASONS} more"
    assert all(len(reason) <= 240 for reason in result.dropped)


def test_long_description_is_truncated_at_a_word_boundary() -> None:
    words = " ".join(f"word{i}" for i in range(300))  # ~2 000 characters
    (task,) = parse_skill_output(block([{"description": words}]), APP)
    assert len(task.description) <= MAX_DESCRIPTION
    assert task.description.endswith("…")
    kept = task.description[:-1]
    assert words.startswith(kept) and words[len(kept)] == " "  # cut between words


def test_giant_single_word_description_is_hard_cut() -> None:
    (task,) = parse_skill_output(block([{"description": "z" * 5000}]), APP)
    assert task.description == "z" * (MAX_DESCRIPTION - 1) + "…"


def test_multiline_and_control_characters_in_descriptions_are_collapsed() -> None:
    raw = (
        f'{TASKS_START}\n[{{"description": "Fix the\n\tlogin\r\n flow", "priority": 2}},'
        f' {{"description": "Colour\\u001b[31m red\\u0000 text"}}]\n{TASKS_END}'
    )
    result = parse_skill_output(raw, APP)
    assert [t.description for t in result] == ["Fix the login flow", "Colour red text"]


# --- tier 2 and fallbacks -------------------------------------------------------------------


def test_no_block_and_no_extractor() -> None:
    result = parse_skill_output("I improved the app a lot.", APP)
    assert result == [] and result.tier == "none"
    assert result.dropped == [NO_BLOCK, NO_EXTRACTOR]
    assert NO_EXTRACTOR == "no structured block and no extractor configured"


def test_no_block_uses_extractor_with_the_output_and_app_id() -> None:
    extractor = RecordingExtractor(answer=THREE)
    result = parse_skill_output("free text about tasks", APP, extractor)
    assert result.tier == "extractor"
    assert len(result) == 3 and {t.source for t in result} == {"skill"}
    assert extractor.calls == [("free text about tasks", APP)]


def test_valid_block_does_not_call_extractor() -> None:
    extractor = RecordingExtractor(answer=THREE)
    result = parse_skill_output(block([{"description": "Only one."}]), APP, extractor)
    assert result.tier == "block" and len(result) == 1
    assert extractor.calls == []
    assert insufficient(result)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('[{"description": "x",}]', "structured block is not valid JSON: "),
        ("no json here at all", "structured block holds no JSON"),
        ('"just a string"', "structured block holds no JSON"),
        ('{"items": []}', 'structured block is an object without a "tasks" list'),
        ("[]", "structured block yielded no valid tasks"),
        ('[{"priority": 9, "description": "bad"}]', "structured block yielded no valid tasks"),
    ],
)
def test_unusable_block_falls_back_to_extractor_or_reports(body: str, reason: str) -> None:
    output = block(body)
    alone = parse_skill_output(output, APP)
    assert alone == [] and alone.tier == "none"
    assert any(r.startswith(reason) for r in alone.dropped), alone.dropped
    assert NO_EXTRACTOR in alone.dropped

    extractor = RecordingExtractor(answer=THREE)
    helped = parse_skill_output(output, APP, extractor)
    assert helped.tier == "extractor" and len(helped) == 3
    assert len(extractor.calls) == 1


def test_truncated_block_falls_back() -> None:
    output = "work...\n" + TASKS_START + '\n[{"priority": 1, "description": "Fix'
    alone = parse_skill_output(output, APP)
    assert alone.tier == "none" and alone == []
    assert alone.dropped == [
        "structured block start marker has no end marker (output truncated?)",
        NO_EXTRACTOR,
    ]
    extractor = RecordingExtractor(answer=THREE[:1])
    helped = parse_skill_output(output, APP, extractor)
    assert (helped.tier, len(helped)) == ("extractor", 1)


def test_extractor_that_raises_is_recorded_not_propagated() -> None:
    extractor = RecordingExtractor(error=RuntimeError("Gemini 503: overloaded"))
    result = parse_skill_output("text", APP, extractor)
    assert result == [] and result.tier == "extractor"
    assert "extractor failed: RuntimeError: Gemini 503: overloaded" in result.dropped


def test_extractor_returning_junk_containers() -> None:
    for junk, shape in [(None, "a NoneType"), ("tasks!", "a str"), ({"x": 1}, "an object")]:
        result = parse_skill_output("text", APP, RecordingExtractor(answer=junk))
        assert result == [] and result.tier == "extractor"
        assert result.dropped[0] == NO_BLOCK
        assert result.dropped[1].startswith(f"extractor result is {shape}"), result.dropped
        assert result.dropped[2:] == ["extractor returned no valid tasks"]


def test_extractor_returning_junk_dicts_keeps_only_valid_ones() -> None:
    answer = [
        1,
        "task",
        {},
        {"description": ""},
        {"priority": "high", "description": "Word priority."},
        {"priority": 2, "description": "Good one.", "source": "adversarial", "extra": [1, 2]},
        {"description": "good ONE."},  # duplicate by key
        Task(app_id="other", description="A model object works too.", priority=4),
    ]
    result = parse_skill_output("text", APP, RecordingExtractor(answer=answer))
    assert result.tier == "extractor"
    assert [(t.description, t.priority, t.source, t.app_id) for t in result] == [
        ("Good one.", 2, "skill", APP),
        ("A model object works too.", 4, "skill", APP),
    ]
    assert result.dropped == [
        NO_BLOCK,
        "extractor[0]: expected an object, got int",
        "extractor[1]: expected an object, got str",
        "extractor[2]: description: Field required",
        "extractor[3]: description: String should have at least 1 character",
        "extractor[4]: priority: Input should be a valid integer,"
        " unable to parse string as an integer",
        "extractor[6]: duplicate of an earlier task (same file and description)",
    ]


def test_extractor_answer_with_tasks_key_is_accepted() -> None:
    result = parse_skill_output("text", APP, RecordingExtractor(answer={"tasks": THREE}))
    assert (result.tier, len(result)) == ("extractor", 3)


# --- hostile input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["a;rm -rf /", "$(reboot)", "App", "", "-x", "a" * 65, "a b", None, 7]
)
def test_invalid_app_id_is_refused_up_front_with_the_rule(bad: object) -> None:
    with pytest.raises(InvalidAppId, match=r"\[a-z0-9\._-\]"):
        parse_skill_output(block(THREE), bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidAppId, match=r"1–64 characters"):
        parse_review_output(None, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("cap", [0, -1, True, "5"])
def test_invalid_cap_is_a_caller_error(cap: object) -> None:
    with pytest.raises(ValueError, match="max_tasks must be a positive integer"):
        parse_skill_output("", APP, max_tasks=cap)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_tasks must be a positive integer"):
        parse_review_output("", APP, max_tasks=cap)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        (None, "output is None: the agent returned nothing"),
        (12345, "output is a int, not text"),
        ({"output": "x"}, "output is a dict, not text"),
        ("", "output is empty"),
        ("  \n\t ", "output is empty"),
        ("\x00\x00", "output is empty"),
    ],
)
def test_non_text_output_never_raises_nor_calls_extractor(output: object, reason: str) -> None:
    extractor = RecordingExtractor(answer=THREE)
    result = parse_skill_output(output, APP, extractor)  # type: ignore[arg-type]
    assert result == [] and result.tier == "none"
    assert result.dropped == [reason]
    assert extractor.calls == []
    review = parse_review_output(output, APP)  # type: ignore[arg-type]
    assert review == [] and review.tier == "review" and review.dropped == [reason]


def test_bytes_output_is_decoded() -> None:
    raw = block(THREE).encode() + b"\xff\xfe"
    assert len(parse_skill_output(raw, APP)) == 3  # type: ignore[arg-type]


def test_nul_bytes_and_ansi_codes_around_the_block_are_ignored() -> None:
    output = "\x1b[32mdone\x1b[0m\x00\n" + block(THREE).replace('"priority"', '"prio\x00rity"')
    assert [t.priority for t in parse_skill_output(output, APP)] == [1, 3, 5]


def test_ten_megabyte_output_without_block_is_fast() -> None:
    output = ("The skill looked at the app and wrote notes. " * 230_000)[:10_000_000]
    extractor = RecordingExtractor(answer=THREE)
    result, seconds = timed(parse_skill_output, output, APP, extractor)
    assert (result.tier, len(result)) == ("extractor", 3)
    assert len(extractor.calls[0][0]) == 10_000_000


def test_ten_megabyte_output_with_block_at_the_end_is_fast() -> None:
    output = "x" * 10_000_000 + "\n" + block(THREE)
    result, seconds = timed(parse_skill_output, output, APP)
    assert (result.tier, len(result)) == ("block", 3)


def test_oversized_block_keeps_the_tasks_before_the_cap_and_says_so() -> None:
    # Changed on purpose (issue 8): an over-cap block used to yield nothing at all.
    filler = [{"description": f"Task {n} " + "y" * 400} for n in range(25_000)]  # ~10 MB
    output = block(filler)
    extractor = RecordingExtractor(answer=THREE)
    result, seconds = timed(parse_skill_output, output, APP, extractor, max_tasks=20_000)
    assert result.tier == "block" and extractor.calls == []
    kept = len(result)
    assert 4000 < kept < 5000  # what fits in the first MAX_BLOCK_CHARS, item by item
    assert [t.description[:8] for t in result[:2]] == ["Task 0 y", "Task 1 y"]
    assert result.dropped == [
        f"structured block is {len(json.dumps(filler)) + 6} characters, over the "
        f"{MAX_BLOCK_CHARS} parsed: kept the {kept} items before that point, the rest were not read"
    ]


def test_oversized_block_that_is_not_an_array_falls_back_with_a_reason() -> None:
    output = block('{"notes": "' + "y" * (MAX_BLOCK_CHARS + 10) + '"}')
    result = parse_skill_output(output, APP, RecordingExtractor(answer=THREE))
    assert result.tier == "extractor" and len(result) == 3
    assert result.dropped[0].startswith("structured block is ")
    assert result.dropped[0].endswith(f"characters, over the {MAX_BLOCK_CHARS} parsed")


def test_oversized_block_under_a_tasks_key_keeps_its_leading_tasks() -> None:
    filler = {"tasks": [{"description": f"T{n} " + "z" * 300} for n in range(10_000)]}
    result = parse_skill_output(block(filler), APP)
    assert result.tier == "block" and len(result) == 500  # the max_tasks cap applies after
    assert result.dropped[0].startswith("structured block is ")
    assert result.dropped[1].endswith("tasks beyond the cap of 500 were not kept")


@pytest.mark.parametrize("depth", [10_000, 900_000])
def test_deeply_nested_block_json_is_caught(depth: int) -> None:
    result = parse_skill_output(block("[" * depth + "]" * depth), APP)
    assert result.tier == "none" and result == []
    assert result.dropped[0] == "structured block JSON nests too deeply to parse"


def test_huge_integer_in_block_does_not_escape() -> None:
    result = parse_skill_output(
        block('[{"priority": ' + "9" * 5000 + ', "description": "x"}]'), APP
    )
    assert result == []
    assert result.dropped[0].startswith("structured block is not usable JSON: ValueError")


def test_pathological_megabyte_line_is_linear() -> None:
    line = "<!-- " * 100_000 + "{[" * 200_000 + " " * 200_000
    result, seconds = timed(parse_skill_output, line, APP)
    assert result.tier == "none"


def test_parse_result_pickles_with_its_tier_and_reasons() -> None:
    result = parse_skill_output(block(THREE + [{"priority": 9, "description": "x"}]), APP)
    again = pickle.loads(pickle.dumps(result))
    assert isinstance(again, ParseResult)
    assert (list(again), again.tier, again.dropped) == (list(result), "block", result.dropped)


def test_insufficient_is_the_quality_floor() -> None:
    two = ParseResult([Task(app_id=APP, description=f"T{i}") for i in range(2)], tier="block")
    three = ParseResult([*two, Task(app_id=APP, description="T2")], tier="block")
    assert insufficient(two) is True
    assert insufficient(three) is False
    assert insufficient(three, floor=4) is True
    assert insufficient(ParseResult(tier="none")) is True


# --- review -----------------------------------------------------------------------------------


REVIEW = """\
Reviewed the app.

ISSUE FILE: Sources/App.swift SEVERITY: critical FIX: Guard against a nil session on launch.
- **ISSUE** FILE: `Sources/Login.swift` SEVERITY: **High** FIX: Validate the email field.
  2. issue file:   Views/Severity.swift   severity:MEDIUM   fix:   Rename the prefix fix helper.
* ISSUE: FILE: - SEVERITY: low FIX: Tidy the README wording.
ISSUE FILE: Sources/Bad.swift SEVERITY: blocker FIX: Unknown severity.
ISSUE FILE: Sources/NoFix.swift SEVERITY: high
Issues found: 5
"""


def test_issue_lines_tolerate_markdown_case_and_spacing() -> None:
    result = parse_review_output(REVIEW, APP)
    assert result.tier == "review"
    assert [(t.file, t.severity, t.priority, t.description) for t in result] == [
        ("Sources/App.swift", "critical", 1, "Guard against a nil session on launch."),
        ("Sources/Login.swift", "high", 2, "Validate the email field."),
        ("Views/Severity.swift", "medium", 3, "Rename the prefix fix helper."),
        (None, "low", 4, "Tidy the README wording."),
    ]
    assert {(t.source, t.app_id) for t in result} == {("adversarial", APP)}
    assert result.dropped == [
        "ISSUE line 7: severity 'blocker' is not one of critical|high|medium|low",
        "ISSUE line 8: no FIX: after SEVERITY:",
    ]


def test_issue_split_over_lines_is_joined() -> None:
    review = "ISSUE FILE: a.swift\nSEVERITY: high\nFIX: Handle the offline state.\nOther text."
    (task,) = parse_review_output(review, APP)
    assert (task.file, task.severity, task.description) == (
        "a.swift",
        "high",
        "Handle the offline state.",
    )


def test_issue_lines_and_trailing_json_merge_without_duplicates() -> None:
    issues = {
        "issues": [
            {
                "file": "sources/app.swift",
                "severity": "critical",
                "description": "guard against a  nil session on launch.",
            },  # dup of line 1
            {
                "file": "Sources/Login.swift",
                "severity": "critical",
                "description": "Validate the email field.",
            },  # dup, more severe
            {"file": "Sources/Net.swift", "severity": "Low", "description": "Retry on timeout."},
            {"file": "Sources/Net.swift", "severity": "bad", "description": "Bad severity."},
            {"file": "Sources/Net.swift", "severity": "high"},
            "junk",
        ]
    }
    review = REVIEW + "```json\n" + json.dumps(issues) + "\n```\n"
    result = parse_review_output(review, APP)
    assert [(t.file, t.severity, t.priority) for t in result] == [
        ("Sources/App.swift", "critical", 1),
        ("Sources/Login.swift", "critical", 1),  # upgraded, wording of the first kept
        ("Views/Severity.swift", "medium", 3),
        (None, "low", 4),
        ("Sources/Net.swift", "low", 4),
    ]
    assert result[1].description == "Validate the email field."
    assert result.dropped == [
        "ISSUE line 7: severity 'blocker' is not one of critical|high|medium|low",
        "ISSUE line 8: no FIX: after SEVERITY:",
        "issues[0]: duplicate of an earlier task (same file and description)",
        "issues[1]: duplicate of an earlier task (same file and description)",
        "issues[3]: severity 'bad' is not one of critical|high|medium|low",
        "issues[4]: description: Field required",
        "issues[5]: expected an object, got str",
    ]


def test_only_the_last_issues_json_is_read() -> None:
    echoed = '{"issues": [{"file": "...", "severity": "...", "description": "..."}]}'
    real = '{"issues": [{"file": "A.swift", "severity": "high", "description": "Real one."}]}'
    result = parse_review_output(f"{echoed}\nthinking...\n{real}", APP)
    assert [t.description for t in result] == ["Real one."]
    assert result.dropped == []


def test_broken_issues_json_keeps_issue_lines() -> None:
    review = "ISSUE FILE: a.swift SEVERITY: low FIX: One.\n" + '{"issues": [{"file": "b.swift", '
    result = parse_review_output(review, APP)
    assert [t.description for t in result] == ["One."]
    assert len(result.dropped) == 1
    assert result.dropped[0].startswith("issues JSON is not valid: ")


@pytest.mark.parametrize(
    ("tail", "reason"),
    [
        ('{"issues": "none"}', '"issues" is a str, expected a list'),
        ('{"issues": ' + "[" * 100_000, "issues JSON nests too deeply to parse"),
    ],
)
def test_unusable_issues_json_is_reported(tail: str, reason: str) -> None:
    result = parse_review_output("Nothing else.\n" + tail, APP)
    assert result == [] and result.dropped == [reason]


def test_review_without_issues_says_so() -> None:
    result = parse_review_output("Looks great, no problems.", APP)
    assert result == [] and result.tier == "review"
    assert result.dropped == ['no ISSUE lines and no {"issues": [...]} JSON in the review']


def test_ten_thousand_issue_lines_are_capped_quickly() -> None:
    review = "\n".join(
        f"ISSUE FILE: Sources/F{i}.swift SEVERITY: high FIX: Fix defect number {i}."
        for i in range(10_000)
    )
    result, seconds = timed(parse_review_output, review, APP)
    assert len(result) == 500
    assert result[-1].file == "Sources/F499.swift"
    assert result.dropped == ["9500 issues beyond the cap of 500 were not kept"]

    everything, seconds = timed(parse_review_output, review, APP, max_tasks=20_000)
    assert len(everything) == 10_000 and everything.dropped == []


def test_pathological_review_lines_are_linear() -> None:
    spaces = "ISSUE FILE: " + " " * 1_000_000 + "SEVERITY" + " " * 1_000_000
    keywords = "ISSUE FILE: x " + "severity " * 200_000
    braces = '{ "issues" ' * 100_000
    for review in (spaces, keywords, braces):
        result, seconds = timed(parse_review_output, review, APP)
        assert result == []


def test_megabyte_fix_description_is_truncated_not_dropped() -> None:
    review = "ISSUE FILE: a.swift SEVERITY: low FIX: " + "word " * 200_000
    (task,) = parse_review_output(review, APP)
    assert len(task.description) <= MAX_DESCRIPTION and task.description.endswith("…")


def test_ten_megabyte_review_is_fast() -> None:
    review = "Notes about the code. " * 450_000 + "\nISSUE FILE: a.swift SEVERITY: low FIX: One.\n"
    result, seconds = timed(parse_review_output, review, APP)
    assert len(result) == 1


# --- review: multi-line ISSUE blocks and streaming ------------------------------------------

BLOCKS = """\
Findings below.

ISSUE
FILE: Sources/App.swift
SEVERITY: critical
FIX: Guard against a nil session on launch.

### Issue 2: Missing validation
- **File:** `Sources/Login.swift`
- **Severity:** High
- **Fix:** Validate the email field.

**ISSUE 3**
SEVERITY: low
FIX: Tidy the README wording.

3. Issue
   Severity: medium
   File: Views/List.swift
   Fix: Reuse cells.

ISSUE 5
FILE: Sources/Net.swift
FIX: Retry on timeout.

Issue tracking is out of scope for this review.
The next line starts like a header but is prose too:
Issues found: 5
"""


def test_multi_line_issue_blocks_parse_alongside_one_line_issues() -> None:
    one_liner = "ISSUE FILE: a.swift SEVERITY: high FIX: One-liner.\n"
    result = parse_review_output(BLOCKS + one_liner, APP)
    assert [(t.file, t.severity, t.description) for t in result] == [
        ("Sources/App.swift", "critical", "Guard against a nil session on launch."),
        ("Sources/Login.swift", "high", "Validate the email field."),
        (None, "low", "Tidy the README wording."),
        ("Views/List.swift", "medium", "Reuse cells."),
        ("a.swift", "high", "One-liner."),
    ]
    assert result.dropped == ["ISSUE line 22: ISSUE block has no SEVERITY: line"]


def test_block_fields_stop_at_the_next_issue_and_prose() -> None:
    review = "ISSUE 1\nSEVERITY: high\nISSUE 2\nSEVERITY: low\nFIX: Second.\nprose\nFIX: stray\n"
    result = parse_review_output(review, APP)
    assert [(t.severity, t.description) for t in result] == [("low", "Second.")]
    assert result.dropped == ["ISSUE line 1: ISSUE block has no FIX: line"]


def test_issue_at_the_very_start_and_after_crlf_and_cr_line_numbers() -> None:
    review = (
        "ISSUE FILE: a SEVERITY: low FIX: A.\r\nprose\r\n"
        "ISSUE FILE: b SEVERITY: bad FIX: B.\rISSUE FILE: c SEVERITY: bad FIX: C.\n"
    )
    result = parse_review_output(review, APP)
    assert [t.file for t in result] == ["a"]
    assert result.dropped == [
        "ISSUE line 3: severity 'bad' is not one of critical|high|medium|low",
        "ISSUE line 4: severity 'bad' is not one of critical|high|medium|low",
    ]


def test_terminal_colours_around_issue_lines_are_looked_through() -> None:
    review = (
        "\x1b[1m\x1b[31m- ISSUE\x1b[0m FILE: a.swift SEVERITY: \x1b[33mhigh\x1b[0m FIX: Do.\n"
        "\x1b[1mISSUE\x1b[0m\n\x1b[2mFILE:\x1b[0m b.swift\nSEVERITY: low\nFIX: Also.\n"
    )
    result = parse_review_output(review, APP)
    assert [(t.file, t.severity, t.description) for t in result] == [
        ("a.swift", "high", "Do."),
        ("b.swift", "low", "Also."),
    ]


def test_an_issue_line_is_read_up_to_its_cap() -> None:
    review = "ISSUE FILE: a.swift SEVERITY: low FIX: " + "x" * (MAX_LINE_CHARS * 4) + "\n"
    (task,) = parse_review_output(review, APP)
    assert task.description.endswith("…")


def test_review_is_never_split_into_a_list_of_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """Structural check of streaming: only the lines that matter are sliced and cleaned."""
    import fleet.parsing as parsing

    cleaned: list[int] = []
    real = parsing._cleaned
    monkeypatch.setattr(parsing, "_cleaned", lambda text: cleaned.append(len(text)) or real(text))
    review = ("prose line\n" * 100_000 + "ISSUE\nFILE: a\nSEVERITY: low\nFIX: x\n") * 3
    result = parse_review_output(review, APP)
    assert len(result) == 1 and max(cleaned) < 100


def test_pathological_block_layouts_stay_bounded() -> None:
    """Shapes aimed at the line reader and its regexes (no timing: each is one linear pass)."""
    decorated = ("\n" + " -*" * 300_000 + "x") * 3  # long decoration, no ISSUE after it
    headers = "ISSUE\n" * 200_000  # headers with no fields ever
    fields = "ISSUE\n" + "FILE: a\n" * 200_000  # one header, a flood of FILE lines
    counted = "ISSUE FILE: a SEVERITY: low FIX: x\n" + "ISSUE " + "y" * 1_000_000 + "\n" * 3
    for review in (decorated, headers, fields):
        assert parse_review_output(review, APP) == []
    assert len(parse_review_output(counted, APP, max_tasks=1)) == 1


def test_past_the_cap_block_issues_are_counted() -> None:
    review = "".join(f"ISSUE {n}\nFILE: f{n}\nSEVERITY: low\nFIX: Do {n}.\n" for n in range(30))
    result = parse_review_output(review + "ISSUE: not followed by fields\n", APP, max_tasks=10)
    assert len(result) == 10
    assert result.dropped == ["20 issues beyond the cap of 10 were not kept"]


def test_a_flood_of_duplicates_is_examined_up_to_a_bound() -> None:
    line = "ISSUE FILE: a.swift SEVERITY: low FIX: Same.\n"
    result = parse_review_output(
        line * 100 + "ISSUE FILE: b SEVERITY: low FIX: New.\n", APP, max_tasks=5
    )
    assert [t.file for t in result] == ["a.swift"]
    assert result.dropped[0] == (
        "51 issues after the first 50 examined were not read "
        "(too many duplicate or invalid ones before them)"
    )
