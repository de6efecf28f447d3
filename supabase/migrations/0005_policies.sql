-- Versioned healing policies (fleet/tuning): the thresholds the optimizer proposes, which one is
-- active, canary trials of a candidate on a share of the machines, and rollback.
-- Re-runnable (IF NOT EXISTS / OR REPLACE). Twin for SQLite: fleet/tuning/policies_sqlite.sql.

CREATE TABLE IF NOT EXISTS mesh_policies (
    version     bigserial PRIMARY KEY,
    genes       jsonb NOT NULL,                  -- FleetSettings field → value
    status      text NOT NULL DEFAULT 'candidate'
                CHECK (status IN ('candidate', 'canary', 'active', 'retired', 'rolled_back')),
    offerable   boolean NOT NULL DEFAULT false,  -- passed the guard rail when it was evolved
    figures     jsonb NOT NULL DEFAULT '{}'::jsonb,  -- replay scores (MTTR, false positives, …)
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL
);
-- At most one active policy.
CREATE UNIQUE INDEX IF NOT EXISTS mesh_policies_one_active ON mesh_policies (status)
    WHERE status = 'active';

CREATE TABLE IF NOT EXISTS mesh_policy_trials (
    id          bigserial PRIMARY KEY,
    candidate   bigint NOT NULL REFERENCES mesh_policies (version),
    control     bigint REFERENCES mesh_policies (version),
    share       double precision NOT NULL CHECK (share > 0 AND share <= 0.5),
    machines    jsonb NOT NULL,                  -- the canary machines
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'promoted', 'rolled_back')),
    started_by  text NOT NULL,
    started_at  timestamptz NOT NULL,
    decided_at  timestamptz,
    decision    jsonb NOT NULL DEFAULT '{}'::jsonb   -- live figures and why
);
-- At most one running trial.
CREATE UNIQUE INDEX IF NOT EXISTS mesh_policy_trials_one_running ON mesh_policy_trials (status)
    WHERE status = 'running';

-- A machine not listed here runs the active policy.
CREATE TABLE IF NOT EXISTS mesh_policy_assignments (
    machine_id  text PRIMARY KEY,
    version     bigint NOT NULL REFERENCES mesh_policies (version),
    trial_id    bigint REFERENCES mesh_policy_trials (id),
    assigned_at timestamptz NOT NULL
);

-- Who did what to which version, when (append-only).
CREATE TABLE IF NOT EXISTS mesh_policy_log (
    id      bigserial PRIMARY KEY,
    version bigint NOT NULL REFERENCES mesh_policies (version),
    action  text NOT NULL CHECK (action IN ('baseline', 'canary', 'promote', 'rollback')),
    by_whom text NOT NULL,
    at      timestamptz NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE OR REPLACE FUNCTION mesh_policy_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'mesh_policy_log is append-only: % refused', TG_OP
        USING HINT = 'append a new entry instead of changing history';
END
$$;
CREATE OR REPLACE TRIGGER mesh_policy_log_append_only
    BEFORE UPDATE OR DELETE ON mesh_policy_log
    FOR EACH ROW EXECUTE FUNCTION mesh_policy_log_append_only();
REVOKE ALL ON FUNCTION mesh_policy_log_append_only() FROM PUBLIC;  -- fires as a trigger only
