"""Timestamps as every store writes them: aware UTC, a naive value read as UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utc(value: datetime) -> datetime:
    """`value` in UTC; a naive datetime is taken to be UTC already (never local time), as
    PostgreSQL's timestamptz reads it in a session whose zone is UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def iso(value: datetime) -> str:
    """Fixed-width ISO 8601 in UTC (microseconds always written), so the strings compare in
    time order inside SQL."""
    return utc(value).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")
