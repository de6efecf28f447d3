-- The mesh's immune system (fleet/mesh/immune.py), mesh identity on queue rows and shared
-- breaker states. Re-runnable (IF NOT EXISTS / OR REPLACE). The claim below replaces the one
-- of 0002_mesh.sql: it honours quarantines (weights, exclusions, one probe) and mesh identity.

-- Mesh identity (seed 001): a row names the mesh and protocol generation it belongs to (NULL =
-- any), and its task type (fleet.mesh.immune.task_type) so a failing family can be excluded.
ALTER TABLE mesh_task_queue ADD COLUMN IF NOT EXISTS mesh_id text;
ALTER TABLE mesh_task_queue ADD COLUMN IF NOT EXISTS generation integer;
ALTER TABLE mesh_task_queue ADD COLUMN IF NOT EXISTS task_type text;

-- One row per subject (`kind:key`) the immune system has seen fail; absent = healthy.
CREATE TABLE IF NOT EXISTS mesh_immune_state (
    subject       text PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('machine', 'pane', 'task_type', 'account')),
    tier          integer NOT NULL DEFAULT 0 CHECK (tier BETWEEN 0 AND 3),
    weight        double precision NOT NULL DEFAULT 1,   -- tier 1's routing weight
    failures      jsonb NOT NULL DEFAULT '[]'::jsonb,    -- failure times inside the window
    successes     jsonb NOT NULL DEFAULT '[]'::jsonb,    -- success times inside the window
    ejections     integer NOT NULL DEFAULT 0,
    until_at      timestamptz,                           -- end of the soft weight / exclusion
    probe_task    text,                                  -- the one task let through after it
    backoff_until timestamptz,                           -- accounts: rate-limited until then
    sensitivity   integer NOT NULL DEFAULT 0,            -- tier 3 recalibration steps
    claim_credit  double precision NOT NULL DEFAULT 0,   -- weighted claim pacing (tier 1)
    reason        text NOT NULL DEFAULT '',
    antibody      text NOT NULL DEFAULT '',              -- signature/corrective awaiting a verdict
    changed_at    timestamptz,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS mesh_immune_state_kind ON mesh_immune_state (kind, tier);

-- Antibodies (seed 000): how each corrective fared per failure signature, mesh-wide.
CREATE TABLE IF NOT EXISTS mesh_antibodies (
    signature  text NOT NULL,
    corrective text NOT NULL,
    successes  integer NOT NULL DEFAULT 0,
    failures   integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (signature, corrective)
);

-- What the immune system decided (quarantine, release, probe, alert, backoff, braked, lift).
CREATE TABLE IF NOT EXISTS mesh_immune_events (
    id      bigserial PRIMARY KEY,
    subject text NOT NULL,
    action  text NOT NULL,
    tier    integer NOT NULL,
    at      timestamptz NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS mesh_immune_events_subject ON mesh_immune_events (subject, id);

CREATE OR REPLACE FUNCTION mesh_immune_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'mesh_immune_events is append-only: % refused', TG_OP
        USING HINT = 'append a new event instead of changing history';
END
$$;
CREATE OR REPLACE TRIGGER mesh_immune_events_append_only
    BEFORE UPDATE OR DELETE ON mesh_immune_events
    FOR EACH ROW EXECUTE FUNCTION mesh_immune_events_append_only();

-- Where each reader of mesh_task_events (the immune feed) has got to.
CREATE TABLE IF NOT EXISTS mesh_event_cursor (
    name          text PRIMARY KEY,
    last_event_id bigint NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- Circuit breaker states as each process last saw them (holder = host:pid), so the watchdog
-- reports the breakers of every process, not only its own.
CREATE TABLE IF NOT EXISTS mesh_breaker_state (
    name       text NOT NULL,
    holder     text NOT NULL,
    state      text NOT NULL CHECK (state IN ('closed', 'open', 'half_open')),
    failures   integer NOT NULL,
    opened_at  timestamptz,
    retry_at   timestamptz,
    last_error text,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (name, holder)
);


-- Atomic claim, honouring identity and the immune system:
-- * a machine that never heartbeated, is down/left, or is a viewer gets nothing;
-- * only rows of its own mesh (or of none) and generation (or none);
-- * a hard-quarantined machine gets nothing until its exclusion ends, then exactly one probe
--   task (recorded in probe_task) until the immune system decides;
-- * a soft-quarantined machine claims at its weight: each call earns weight × limit credit
--   (capped at limit) and a task costs one, so weight 0.5 claims half as much;
-- * rows of a hard-quarantined task type are skipped, except one probe once it is due.
CREATE OR REPLACE FUNCTION mesh_claim(p_machine_id text, p_now timestamptz, p_limit integer DEFAULT 1)
RETURNS SETOF mesh_task_queue
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_mesh   text;
    v_gen    integer;
    v_role   text;
    v_status text;
    v_state  mesh_immune_state%ROWTYPE;
    v_found  boolean;
    v_limit  integer := greatest(p_limit, 0);
    v_credit double precision;
    v_probe  boolean := false;
    v_n      integer;
BEGIN
    SELECT h.mesh_id, h.generation, h.role, h.status INTO v_mesh, v_gen, v_role, v_status
    FROM mesh_health h WHERE h.machine_id = p_machine_id;
    IF NOT FOUND OR v_status IN ('down', 'left') OR v_role = 'viewer' OR v_limit = 0 THEN
        RETURN;
    END IF;

    SELECT * INTO v_state FROM mesh_immune_state s
    WHERE s.subject = 'machine:' || p_machine_id FOR UPDATE;
    v_found := FOUND;
    IF v_found AND v_state.tier >= 2 THEN
        IF v_state.probe_task IS NOT NULL OR v_state.until_at IS NULL OR v_state.until_at > p_now THEN
            RETURN;
        END IF;
        v_probe := true;
        v_limit := 1;
    ELSIF v_found AND v_state.tier = 1 AND v_state.until_at > p_now AND v_state.weight < 1 THEN
        v_credit := least(v_state.claim_credit + v_state.weight * v_limit, v_limit::double precision);
        v_limit := floor(v_credit)::integer;
        IF v_limit = 0 THEN
            UPDATE mesh_immune_state SET claim_credit = v_credit
            WHERE subject = 'machine:' || p_machine_id;
            RETURN;
        END IF;
    END IF;

    RETURN QUERY
    WITH picked AS (
        SELECT q.task_id
        FROM mesh_task_queue q
        WHERE q.status = 'queued'
          AND (q.target IS NULL OR q.target = p_machine_id)
          AND (q.mesh_id IS NULL OR q.mesh_id = v_mesh)
          AND (q.generation IS NULL OR q.generation = v_gen)
          AND NOT EXISTS (
              SELECT 1 FROM mesh_immune_state s
              WHERE s.subject = 'task_type:' || q.task_type AND s.tier >= 2
                AND (s.probe_task IS NOT NULL OR s.until_at IS NULL OR s.until_at > p_now))
          -- A due quarantined type lets only its oldest queued row through: one probe.
          AND (NOT EXISTS (
                   SELECT 1 FROM mesh_immune_state s
                   WHERE s.subject = 'task_type:' || q.task_type AND s.tier >= 2)
               OR q.task_id = (
                   SELECT q2.task_id FROM mesh_task_queue q2
                   WHERE q2.status = 'queued' AND q2.task_type = q.task_type
                   ORDER BY q2.created_at, q2.task_id LIMIT 1))
        ORDER BY q.created_at, q.task_id
        LIMIT v_limit
        FOR UPDATE OF q SKIP LOCKED
    ), claimed AS (
        UPDATE mesh_task_queue q
        SET status = 'claimed', claimed_by = p_machine_id, claimed_at = p_now,
            claim_seq = q.claim_seq + 1, progress_at = NULL, pane_id = NULL
        FROM picked
        WHERE q.task_id = picked.task_id
        RETURNING q.*
    ), logged AS (
        INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
        SELECT c.task_id, 'claimed', p_machine_id, p_now,
               jsonb_build_object('attempts', c.attempts, 'claim_seq', c.claim_seq)
        FROM claimed c
    ), type_probes AS (
        -- A due, hard-quarantined task type: the row just claimed is its probe.
        UPDATE mesh_immune_state s SET probe_task = c.task_id, updated_at = p_now
        FROM (SELECT DISTINCT ON (task_type) task_type, task_id FROM claimed
              WHERE task_type IS NOT NULL ORDER BY task_type, created_at, task_id) c
        WHERE s.subject = 'task_type:' || c.task_type AND s.tier >= 2 AND s.probe_task IS NULL
    )
    SELECT * FROM claimed ORDER BY created_at, task_id;
    GET DIAGNOSTICS v_n = ROW_COUNT;

    IF v_probe AND v_n > 0 THEN
        UPDATE mesh_immune_state SET probe_task = (
            SELECT q.task_id FROM mesh_task_queue q
            WHERE q.claimed_by = p_machine_id AND q.claimed_at = p_now AND q.status = 'claimed'
            ORDER BY q.created_at, q.task_id LIMIT 1), updated_at = p_now
        WHERE subject = 'machine:' || p_machine_id;
    ELSIF v_credit IS NOT NULL THEN
        UPDATE mesh_immune_state SET claim_credit = v_credit - v_n
        WHERE subject = 'machine:' || p_machine_id;
    END IF;
END
$$;


ALTER TABLE mesh_immune_state ENABLE ROW LEVEL SECURITY;
ALTER TABLE mesh_antibodies ENABLE ROW LEVEL SECURITY;
ALTER TABLE mesh_immune_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE mesh_event_cursor ENABLE ROW LEVEL SECURITY;
ALTER TABLE mesh_breaker_state ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON FUNCTION mesh_immune_events_append_only() FROM PUBLIC;
REVOKE ALL ON FUNCTION mesh_claim(text, timestamptz, integer) FROM PUBLIC;

DO $$
DECLARE
    v_role text;
    v_table text;
    v_tables text[] := ARRAY['mesh_immune_state', 'mesh_antibodies', 'mesh_immune_events',
                             'mesh_event_cursor', 'mesh_breaker_state'];
BEGIN
    -- As 0002: closed to `anon` and `authenticated`; `service_role` reads and writes.
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            FOREACH v_table IN ARRAY v_tables LOOP
                EXECUTE format('REVOKE ALL ON TABLE %I FROM %I', v_table, v_role);
            END LOOP;
            EXECUTE format('REVOKE ALL ON SEQUENCE mesh_immune_events_id_seq FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON FUNCTION mesh_immune_events_append_only() FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON FUNCTION mesh_claim(text, timestamptz, integer) FROM %I',
                           v_role);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        FOREACH v_table IN ARRAY v_tables LOOP
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %I TO service_role', v_table);
        END LOOP;
        EXECUTE 'GRANT USAGE, SELECT ON SEQUENCE mesh_immune_events_id_seq TO service_role';
        EXECUTE 'GRANT EXECUTE ON FUNCTION mesh_claim(text, timestamptz, integer) TO service_role';
    END IF;
END
$$;
