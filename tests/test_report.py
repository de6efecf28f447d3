"""What an operator reads: the result table, whole at 80 columns and in a log file."""

from __future__ import annotations

import io

from rich.console import Console

from fleet.report import AppRow, failure_message, progress_line, result_table

IDS = ("demo-notes", "demo-weather", "com.example.notes-ios")


def rows() -> list[AppRow]:
    return [
        AppRow(
            app=app_id,
            stage="complete",
            skill_tasks=3,
            adversarial_issues=2,
            quality=0.93,
            shipped=True,
            duration_s=12.5,
            note="already complete",
        )
        for app_id in IDS
    ]


def rendered(console: Console) -> str:
    console.print(result_table(rows()))
    file = console.file
    assert isinstance(file, io.StringIO)
    return file.getvalue()


def test_app_ids_stay_whole_at_80_columns():
    text = rendered(Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None))
    for app_id in IDS:
        assert app_id in text, text
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80


def test_app_ids_stay_whole_in_a_log_file():
    # `fleet demo > log`: not a terminal, rich's default width of 80, no colour codes.
    text = rendered(Console(file=io.StringIO()))
    for app_id in IDS:
        assert app_id in text, text
    assert "\x1b[" not in text and max(len(line) for line in text.splitlines()) <= 80


def test_an_id_too_long_for_the_screen_folds_instead_of_losing_its_end():
    long_id = "com.example." + "x" * 40 + ".ios"
    row = rows()[0].model_copy(update={"app": long_id, "note": None})
    console = Console(file=io.StringIO(), width=80)
    console.print(result_table([row]))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    lines = text.splitlines()
    body = lines[next(i for i, line in enumerate(lines) if "───" in line) + 1 :]
    assert "".join(line.split()[0] for line in body if line.strip()) == long_id
    assert "…" not in text


def test_progress_counts_done_and_failed_apart():
    assert progress_line(2, 1, 3) == "2 done, 1 failed of 3"


def test_a_failed_cohort_says_which_apps_failed_and_why_in_one_line():
    message = failure_message(
        {"demo-calc": "review: model quota exhausted\nTraceback …", "demo-notes": "x" * 500},
        started=3,
    )
    assert message.startswith("2 of 3 apps failed — demo-calc: review: model quota exhausted; ")
    assert "\n" not in message and "Traceback" not in message and len(message) < 300
