-- Schema of the embedded SQLite store; mirrors supabase/migrations for the pipeline tables.
PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS app_evolution_states (
    app_id           TEXT PRIMARY KEY,
    stage            TEXT NOT NULL DEFAULT 'queued',
    error            TEXT,
    epoch            INTEGER NOT NULL DEFAULT 0,
    owner            TEXT,
    run_id           TEXT,
    lease_until      TEXT,
    stage_started_at TEXT,
    updated_at       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS app_evolution_states_stage ON app_evolution_states (stage);

CREATE TABLE IF NOT EXISTS app_evolution_tasks (
    task_key    TEXT PRIMARY KEY,
    app_id      TEXT NOT NULL,
    source      TEXT NOT NULL CHECK (source IN ('skill', 'adversarial')),
    priority    INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 5),
    description TEXT NOT NULL,
    severity    TEXT,
    file        TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS app_evolution_tasks_app ON app_evolution_tasks (app_id, source);

CREATE TABLE IF NOT EXISTS trajectories (
    app_id             TEXT NOT NULL,
    run_id             TEXT NOT NULL,
    pipeline           TEXT NOT NULL,
    skill_tasks        INTEGER NOT NULL,
    adversarial_issues INTEGER NOT NULL,
    quality_score      REAL,
    outcome            TEXT NOT NULL CHECK (outcome IN ('success', 'failure')),
    reward             REAL NOT NULL,
    durations          TEXT NOT NULL,
    error              TEXT,
    created_at         TEXT NOT NULL,
    PRIMARY KEY (app_id, run_id)
);

CREATE TABLE IF NOT EXISTS fleet_config (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS cohorts (
    run_id      TEXT PRIMARY KEY,
    app_ids     TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT
);

CREATE TABLE IF NOT EXISTS fleet_leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    epoch       INTEGER NOT NULL DEFAULT 1,
    acquired_at TEXT NOT NULL,
    renewed_at  TEXT NOT NULL,
    expires_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS app_effects (
    app_id     TEXT NOT NULL,
    key        TEXT NOT NULL,
    kind       TEXT NOT NULL
               CHECK (kind IN ('spawn', 'dispatch', 'ship', 'snapshot', 'marker')),
    value      TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (app_id, key)
);

-- The cost and work ledger (supabase/migrations/0009_ledger.sql).
CREATE TABLE IF NOT EXISTS work_ledger (
    id           TEXT PRIMARY KEY,
    app_id       TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    stage        TEXT NOT NULL,
    task_key     TEXT NOT NULL,
    account      TEXT NOT NULL DEFAULT '',
    outcome      TEXT NOT NULL CHECK (outcome IN ('answered', 'failed')),
    wall_seconds REAL NOT NULL CHECK (wall_seconds >= 0),
    tokens_in    INTEGER CHECK (tokens_in >= 0),
    tokens_out   INTEGER CHECK (tokens_out >= 0),
    cost_usd     REAL CHECK (cost_usd >= 0),
    recorded_at  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS work_ledger_app ON work_ledger (app_id);
CREATE INDEX IF NOT EXISTS work_ledger_run ON work_ledger (run_id);
CREATE INDEX IF NOT EXISTS work_ledger_recorded ON work_ledger (recorded_at);
