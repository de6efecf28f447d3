"""COST/TOKENS reports in agent output: read line by line, streaming-safe, bounded."""

from __future__ import annotations

import pytest

from fleet.parsing import MAX_USAGE_LINE, UsageMeter, parse_usage

pytestmark = pytest.mark.timeout(60)


def test_reads_cost_and_tokens_lines():
    usage = parse_usage("working…\nCOST: $0.42\nTOKENS: in=12,345 out=678\ndone\n")
    assert (usage.cost_usd, usage.tokens_in, usage.tokens_out) == (0.42, 12345, 678)
    assert usage.reported and usage.dropped == []


def test_spellings_agents_use():
    usage = parse_usage("  > **cost**: 1.5 USD\r\n- Tokens: input=10 output=20\n")
    assert (usage.cost_usd, usage.tokens_in, usage.tokens_out) == (1.5, 10, 20)


def test_the_account_the_agent_ran_under():
    assert parse_usage("ACCOUNT: team-max-2\n").account == "team-max-2"
    assert parse_usage("ACCOUNT: a b\n").account is None
    assert parse_usage("ACCOUNT: " + "x" * 65 + "\n").account is None
    assert not parse_usage("ACCOUNT: team\n").reported  # who ran it is not a cost


def test_the_last_report_wins_and_a_partial_tokens_line_keeps_the_other_count():
    usage = parse_usage("COST: $1\nTOKENS: in=5 out=6\nCOST: $2.25\nTOKENS: out=9\n")
    assert (usage.cost_usd, usage.tokens_in, usage.tokens_out) == (2.25, 5, 9)


def test_nothing_reported_is_all_none():
    for output in ("", "no report here", None, 42, b"COST: $3\n"):
        usage = parse_usage(output)
        assert usage.reported == (output == b"COST: $3\n")


@pytest.mark.parametrize(
    "line",
    [
        "the COST: $5 was high",  # not at the start of a line
        "COST: $5 and more words",
        "COST: -5",
        "COST: $1e309",
        "COST: nan",
        "TOKENS: in=abc",
        "TOKENS: in=1,23 out=4",  # not a thousands grouping
        "COST: $" + "9" * 40,
    ],
)
def test_hostile_or_malformed_lines_are_not_reports(line):
    assert not parse_usage(line + "\n").reported


def test_values_beyond_the_bounds_are_dropped_with_a_reason():
    usage = parse_usage("COST: $9999999\nTOKENS: in=9999999999999999\nTOKENS: \n")
    assert not usage.reported
    assert usage.dropped == [
        "COST 9999999 is beyond 1e+06 USD",
        "TOKENS beyond 1000000000000 on one line",
        "TOKENS line without in= or out=",
    ]


def test_a_report_split_across_chunks_still_counts():
    text = "noise\nCOST: $0.75\nTOKENS: in=100 out=200\n"
    for size in (1, 2, 3, 7):
        meter = UsageMeter()
        for i in range(0, len(text), size):
            meter.feed(text[i : i + size])
        usage = meter.usage()
        assert (usage.cost_usd, usage.tokens_in, usage.tokens_out) == (0.75, 100, 200), size


def test_an_unfinished_last_line_counts_at_the_end():
    meter = UsageMeter()
    meter.feed("x\nCOST: $3")
    assert meter.usage().cost_usd == 3.0


def test_an_endless_line_is_bounded_and_the_next_line_still_reads():
    meter = UsageMeter()
    meter.feed("COST: $1" + " " * (MAX_USAGE_LINE * 4))
    meter.feed(" " * 10_000_000)
    assert len(meter._tail) <= MAX_USAGE_LINE
    meter.feed("\nCOST: $2\n")
    assert meter.usage().cost_usd == 2.0


def test_a_huge_output_is_read_in_one_pass():
    output = ("x" * 1000 + "\n") * 100_000 + "COST: $0.10\n" + "\n" * 1_000_000
    assert parse_usage(output).cost_usd == 0.10


def test_a_flood_of_near_miss_report_lines_stays_linear():
    # Every line starts like a report and fails late: one bounded attempt per line.
    usage = parse_usage("COST: 1 2\nTOKENS: in=1 out=x\n" * 500_000 + "COST: $4\n")
    assert usage.cost_usd == 4.0 and usage.tokens_in is None
