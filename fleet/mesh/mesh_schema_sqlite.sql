-- The mesh tables on SQLite; mirrors supabase/migrations/0002_mesh.sql. Timestamps are
-- fixed-width UTC ISO strings (microseconds always present), so they compare in time order.
PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS mesh_health (
    machine_id           TEXT PRIMARY KEY,
    mesh_id              TEXT NOT NULL,
    role                 TEXT NOT NULL CHECK (role IN ('worker', 'planner', 'viewer')),
    generation           INTEGER NOT NULL,
    last_heartbeat       TEXT NOT NULL,
    health_url           TEXT,
    active_tasks         TEXT NOT NULL DEFAULT '[]',
    status               TEXT NOT NULL DEFAULT 'alive'
                         CHECK (status IN ('alive', 'suspect', 'down', 'left')),
    failed_confirmations INTEGER NOT NULL DEFAULT 0,
    status_changed_at    TEXT,
    updated_at           TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS mesh_task_queue (
    task_id     TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    command     TEXT NOT NULL,
    target      TEXT,
    model       TEXT,
    status      TEXT NOT NULL DEFAULT 'queued' CHECK (status IN (
                    'queued', 'claimed', 'injected', 'running',
                    'done', 'failed', 'expired', 'dead_letter')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    claim_seq   INTEGER NOT NULL DEFAULT 0,  -- bumped by every claim; fences agents' writes
    claimed_by  TEXT,
    pane_id     TEXT,
    created_at  TEXT NOT NULL,
    claimed_at  TEXT,
    progress_at TEXT,
    finished_at TEXT,
    output      TEXT,
    error       TEXT,
    checkpoint  TEXT
);
CREATE INDEX IF NOT EXISTS mesh_task_queue_queued
    ON mesh_task_queue (created_at, task_id) WHERE status = 'queued';
-- The orphan and stuck rules cover every in-flight state (these replace the indexes that
-- covered only 'claimed' and only 'injected').
DROP INDEX IF EXISTS mesh_task_queue_claimed;
DROP INDEX IF EXISTS mesh_task_queue_injected;
CREATE INDEX IF NOT EXISTS mesh_task_queue_in_flight
    ON mesh_task_queue (claimed_at) WHERE status IN ('claimed', 'injected', 'running');
CREATE INDEX IF NOT EXISTS mesh_task_queue_in_pane
    ON mesh_task_queue (COALESCE(progress_at, claimed_at)) WHERE status IN ('injected', 'running');
CREATE INDEX IF NOT EXISTS mesh_task_queue_unfinished
    ON mesh_task_queue (created_at) WHERE status IN ('queued', 'claimed', 'injected', 'running');
CREATE INDEX IF NOT EXISTS mesh_task_queue_claimer
    ON mesh_task_queue (claimed_by) WHERE status IN ('claimed', 'injected', 'running');
CREATE INDEX IF NOT EXISTS mesh_task_queue_status ON mesh_task_queue (status);

CREATE TABLE IF NOT EXISTS mesh_task_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id    TEXT,
    event      TEXT NOT NULL,
    machine_id TEXT,
    at         TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS mesh_task_events_task ON mesh_task_events (task_id, id);
CREATE INDEX IF NOT EXISTS mesh_task_events_event ON mesh_task_events (event, id);

-- The event log is history: refuse edits and deletions.
CREATE TRIGGER IF NOT EXISTS mesh_task_events_no_update BEFORE UPDATE ON mesh_task_events
BEGIN
    SELECT RAISE(ABORT, 'mesh_task_events is append-only: UPDATE refused');
END;
CREATE TRIGGER IF NOT EXISTS mesh_task_events_no_delete BEFORE DELETE ON mesh_task_events
BEGIN
    SELECT RAISE(ABORT, 'mesh_task_events is append-only: DELETE refused');
END;

CREATE TABLE IF NOT EXISTS mesh_pane_state (
    machine_id    TEXT NOT NULL,
    pane_id       TEXT NOT NULL,
    task_id       TEXT,
    claim_seq     INTEGER,  -- the claim of task_id this row describes
    alive         INTEGER NOT NULL,
    context_ratio REAL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (machine_id, pane_id)
);

-- The immune system, event cursors and shared breaker states; mirrors
-- supabase/migrations/0003_immune.sql (the queue's mesh_id, generation and task_type
-- columns are added on open: see _ADDED_COLUMNS in sqlite_store.py).
CREATE TABLE IF NOT EXISTS mesh_immune_state (
    subject       TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('machine', 'pane', 'task_type', 'account')),
    tier          INTEGER NOT NULL DEFAULT 0 CHECK (tier BETWEEN 0 AND 3),
    weight        REAL NOT NULL DEFAULT 1,
    failures      TEXT NOT NULL DEFAULT '[]',
    successes     TEXT NOT NULL DEFAULT '[]',
    ejections     INTEGER NOT NULL DEFAULT 0,
    until_at      TEXT,
    probe_task    TEXT,
    backoff_until TEXT,
    sensitivity   INTEGER NOT NULL DEFAULT 0,
    claim_credit  REAL NOT NULL DEFAULT 0,
    reason        TEXT NOT NULL DEFAULT '',
    antibody      TEXT NOT NULL DEFAULT '',
    changed_at    TEXT,
    updated_at    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS mesh_immune_state_kind ON mesh_immune_state (kind, tier);

CREATE TABLE IF NOT EXISTS mesh_antibodies (
    signature  TEXT NOT NULL,
    corrective TEXT NOT NULL,
    successes  INTEGER NOT NULL DEFAULT 0,
    failures   INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (signature, corrective)
);

CREATE TABLE IF NOT EXISTS mesh_immune_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    action  TEXT NOT NULL,
    tier    INTEGER NOT NULL,
    at      TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS mesh_immune_events_subject ON mesh_immune_events (subject, id);
CREATE TRIGGER IF NOT EXISTS mesh_immune_events_no_update BEFORE UPDATE ON mesh_immune_events
BEGIN
    SELECT RAISE(ABORT, 'mesh_immune_events is append-only: UPDATE refused');
END;
CREATE TRIGGER IF NOT EXISTS mesh_immune_events_no_delete BEFORE DELETE ON mesh_immune_events
BEGIN
    SELECT RAISE(ABORT, 'mesh_immune_events is append-only: DELETE refused');
END;

CREATE TABLE IF NOT EXISTS mesh_event_cursor (
    name          TEXT PRIMARY KEY,
    last_event_id INTEGER NOT NULL,
    updated_at    TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS mesh_breaker_state (
    name       TEXT NOT NULL,
    holder     TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    failures   INTEGER NOT NULL,
    opened_at  TEXT,
    retry_at   TEXT,
    last_error TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (name, holder)
);

-- Heartbeat history for the healing tuner's replay: SQLite twin of
-- supabase/migrations/0008_heartbeat_log.sql (each new heartbeat logged, that machine's
-- entries older than 8 days pruned).
CREATE TABLE IF NOT EXISTS mesh_heartbeat_log (
    machine_id TEXT NOT NULL,
    at         TEXT NOT NULL,
    PRIMARY KEY (machine_id, at)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS mesh_heartbeat_log_at ON mesh_heartbeat_log (at);
CREATE TRIGGER IF NOT EXISTS mesh_heartbeat_logged_insert AFTER INSERT ON mesh_health
BEGIN
    INSERT OR IGNORE INTO mesh_heartbeat_log (machine_id, at)
    VALUES (NEW.machine_id, NEW.last_heartbeat);
END;
CREATE TRIGGER IF NOT EXISTS mesh_heartbeat_logged AFTER UPDATE OF last_heartbeat ON mesh_health
WHEN NEW.last_heartbeat IS NOT OLD.last_heartbeat
BEGIN
    INSERT OR IGNORE INTO mesh_heartbeat_log (machine_id, at)
    VALUES (NEW.machine_id, NEW.last_heartbeat);
    -- Timestamps are fixed-width ISO 8601 (fleet.store.timestamps.iso): text order is time order.
    DELETE FROM mesh_heartbeat_log
    WHERE machine_id = NEW.machine_id
      AND at < strftime('%Y-%m-%dT%H:%M:%f000+00:00', NEW.last_heartbeat, '-8 days');
END;
