"""Prefect server settings the engine needs under load, applied to ephemeral and real servers.

With the defaults (batch size 1) the task-run recorder and event persister fall behind a
cohort's burst of task runs: on PostgreSQL task-run records are dropped, on SQLite the
API answers 503. `prefect server start` reads the same variables (see README).
"""

from __future__ import annotations

import os

SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE": "100",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_READ_BATCH_SIZE": "100",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # A first start migrates a new database; on a busy 2-core machine that takes over the
    # default 20 s, and `fleet demo` would fail before its first app.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # `prefect deployment run --watch` prints a run's log lines (a refused parameter's one
    # line among them) only when the server streams logs out.
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
    "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
    # Our own `fleet.*` loggers show up in the Prefect UI next to the flow's logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "fleet",
}


def apply_server_settings() -> None:
    """Set each variable unless the operator already chose a value."""
    for name, value in SERVER_SETTINGS.items():
        os.environ.setdefault(name, value)
