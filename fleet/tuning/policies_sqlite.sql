-- SQLite twin of supabase/migrations/0005_policies.sql (versioned healing policies).
CREATE TABLE IF NOT EXISTS mesh_policies (
    version     INTEGER PRIMARY KEY AUTOINCREMENT,
    genes       text NOT NULL,
    status      text NOT NULL DEFAULT 'candidate'
                CHECK (status IN ('candidate', 'canary', 'active', 'retired', 'rolled_back')),
    offerable   integer NOT NULL DEFAULT 0,
    figures     text NOT NULL DEFAULT '{}',
    created_by  text NOT NULL,
    created_at  text NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS mesh_policies_one_active ON mesh_policies (status)
    WHERE status = 'active';

CREATE TABLE IF NOT EXISTS mesh_policy_trials (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    candidate   integer NOT NULL REFERENCES mesh_policies (version),
    control     integer REFERENCES mesh_policies (version),
    share       real NOT NULL CHECK (share > 0 AND share <= 0.5),
    machines    text NOT NULL,
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'promoted', 'rolled_back')),
    started_by  text NOT NULL,
    started_at  text NOT NULL,
    decided_at  text,
    decision    text NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS mesh_policy_trials_one_running ON mesh_policy_trials (status)
    WHERE status = 'running';

CREATE TABLE IF NOT EXISTS mesh_policy_assignments (
    machine_id  text PRIMARY KEY,
    version     integer NOT NULL REFERENCES mesh_policies (version),
    trial_id    integer REFERENCES mesh_policy_trials (id),
    assigned_at text NOT NULL
);

CREATE TABLE IF NOT EXISTS mesh_policy_log (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    version integer NOT NULL REFERENCES mesh_policies (version),
    action  text NOT NULL CHECK (action IN ('baseline', 'canary', 'promote', 'rollback')),
    by_whom text NOT NULL,
    at      text NOT NULL,
    detail  text NOT NULL DEFAULT '{}'
);
CREATE TRIGGER IF NOT EXISTS mesh_policy_log_no_update BEFORE UPDATE ON mesh_policy_log
BEGIN SELECT RAISE(ABORT, 'mesh_policy_log is append-only: UPDATE refused'); END;
CREATE TRIGGER IF NOT EXISTS mesh_policy_log_no_delete BEFORE DELETE ON mesh_policy_log
BEGIN SELECT RAISE(ABORT, 'mesh_policy_log is append-only: DELETE refused'); END;
