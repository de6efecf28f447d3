-- The self-healing mesh: heartbeats, the task queue, its append-only events, pane state,
-- the atomic claim and the set-based reconciler. Re-runnable (IF NOT EXISTS / OR REPLACE).
-- The rules mirror fleet/mesh/rules.py; boundaries are strict (older than the cutoff).

CREATE TABLE IF NOT EXISTS mesh_health (
    machine_id           text PRIMARY KEY,
    mesh_id              text NOT NULL,
    role                 text NOT NULL CHECK (role IN ('worker', 'planner', 'viewer')),
    generation           integer NOT NULL,
    last_heartbeat       timestamptz NOT NULL,
    health_url           text,
    active_tasks         jsonb NOT NULL DEFAULT '[]'::jsonb,
    status               text NOT NULL DEFAULT 'alive'
                         CHECK (status IN ('alive', 'suspect', 'down', 'left')),
    failed_confirmations integer NOT NULL DEFAULT 0,
    status_changed_at    timestamptz,
    updated_at           timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS mesh_task_queue (
    task_id     text PRIMARY KEY,
    kind        text NOT NULL,
    command     jsonb NOT NULL,
    target      text,
    model       text,
    status      text NOT NULL DEFAULT 'queued' CHECK (status IN (
                    'queued', 'claimed', 'injected', 'running',
                    'done', 'failed', 'expired', 'dead_letter')),
    attempts    integer NOT NULL DEFAULT 0,
    claim_seq   integer NOT NULL DEFAULT 0,  -- bumped by every claim; fences agents' writes
    claimed_by  text,
    pane_id     text,
    created_at  timestamptz NOT NULL,
    claimed_at  timestamptz,
    progress_at timestamptz,
    finished_at timestamptz,
    output      text,
    error       text,
    checkpoint  text
);

-- Claim: the oldest queued rows first; only queued rows are in the index.
CREATE INDEX IF NOT EXISTS mesh_task_queue_queued
    ON mesh_task_queue (created_at, task_id) WHERE status = 'queued';
-- The orphan and stuck rules cover every in-flight state; these replace the first
-- indexes, which covered only 'claimed' and only 'injected'.
DROP INDEX IF EXISTS mesh_task_queue_claimed;
DROP INDEX IF EXISTS mesh_task_queue_injected;
-- Orphan rule: stale in-flight rows by claimed_at, so a cycle reads stale rows, not the table.
CREATE INDEX IF NOT EXISTS mesh_task_queue_in_flight
    ON mesh_task_queue (claimed_at) WHERE status IN ('claimed', 'injected', 'running');
-- Stuck rule: rows in a pane (injected, running) by their last sign of life.
CREATE INDEX IF NOT EXISTS mesh_task_queue_in_pane
    ON mesh_task_queue ((COALESCE(progress_at, claimed_at))) WHERE status IN ('injected', 'running');
-- Expiry rule: unfinished rows by age.
CREATE INDEX IF NOT EXISTS mesh_task_queue_unfinished
    ON mesh_task_queue (created_at) WHERE status IN ('queued', 'claimed', 'injected', 'running');
-- tasks_of, mark_down, leave and the down-machine rule: active rows by claimer.
CREATE INDEX IF NOT EXISTS mesh_task_queue_claimer
    ON mesh_task_queue (claimed_by) WHERE status IN ('claimed', 'injected', 'running');
-- queue_stats: depth per status.
CREATE INDEX IF NOT EXISTS mesh_task_queue_status ON mesh_task_queue (status);

CREATE TABLE IF NOT EXISTS mesh_task_events (
    id         bigserial PRIMARY KEY,
    task_id    text,
    event      text NOT NULL,
    machine_id text,
    at         timestamptz NOT NULL,
    detail     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS mesh_task_events_task ON mesh_task_events (task_id, id);
CREATE INDEX IF NOT EXISTS mesh_task_events_event ON mesh_task_events (event, id);

-- The event log is history: refuse edits and deletions (TRUNCATE stays an operator's tool).
CREATE OR REPLACE FUNCTION mesh_task_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'mesh_task_events is append-only: % refused', TG_OP
        USING HINT = 'append a new event instead of changing history';
END
$$;
CREATE OR REPLACE TRIGGER mesh_task_events_append_only
    BEFORE UPDATE OR DELETE ON mesh_task_events
    FOR EACH ROW EXECUTE FUNCTION mesh_task_events_append_only();

CREATE TABLE IF NOT EXISTS mesh_pane_state (
    machine_id    text NOT NULL,
    pane_id       text NOT NULL,
    task_id       text,
    claim_seq     integer,  -- the claim of task_id this row describes
    alive         boolean NOT NULL,
    context_ratio double precision,
    updated_at    timestamptz NOT NULL,
    PRIMARY KEY (machine_id, pane_id)
);

-- Columns added after the first release (databases created before them get them here).
ALTER TABLE mesh_task_queue ADD COLUMN IF NOT EXISTS claim_seq integer NOT NULL DEFAULT 0;
ALTER TABLE mesh_pane_state ADD COLUMN IF NOT EXISTS claim_seq integer;


-- Atomic claim: SKIP LOCKED lets concurrent claimers take disjoint rows without waiting.
-- A machine whose row says down/left, or a viewer, gets nothing until it heartbeats.
CREATE OR REPLACE FUNCTION mesh_claim(p_machine_id text, p_now timestamptz, p_limit integer DEFAULT 1)
RETURNS SETOF mesh_task_queue
-- plpgsql, not sql: its statement plan is cached per session instead of re-planned per call.
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN QUERY
    WITH picked AS (
        SELECT q.task_id
        FROM mesh_task_queue q
        WHERE q.status = 'queued'
          AND (q.target IS NULL OR q.target = p_machine_id)
          AND NOT EXISTS (
              SELECT 1 FROM mesh_health h
              WHERE h.machine_id = p_machine_id
                AND (h.status IN ('down', 'left') OR h.role = 'viewer'))
        ORDER BY q.created_at, q.task_id
        LIMIT greatest(p_limit, 0)
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
    )
    SELECT * FROM claimed ORDER BY created_at, task_id;
END
$$;


-- Requeue the given rows as one failed attempt each (dead-letter past p_max_attempts),
-- log one event per row, and return (requeued, dead_lettered). Callers pick the rows by
-- their rule under FOR UPDATE SKIP LOCKED (the rule is re-checked on the locked row, and
-- a row another session holds waits for the next cycle instead of deadlocking).
CREATE OR REPLACE FUNCTION mesh_requeue_failed(
    p_task_ids text[], p_now timestamptz, p_max_attempts integer, p_reason text,
    OUT requeued integer, OUT dead_lettered integer)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    WITH cand AS (
        SELECT q.task_id, q.claimed_by
        FROM mesh_task_queue q
        WHERE q.task_id = ANY (p_task_ids)
          AND q.status IN ('claimed', 'injected', 'running')
        FOR UPDATE OF q SKIP LOCKED
    ), moved AS (
        UPDATE mesh_task_queue q
        SET attempts = q.attempts + 1,
            status = CASE WHEN q.attempts + 1 > p_max_attempts THEN 'dead_letter' ELSE 'queued' END,
            finished_at = CASE WHEN q.attempts + 1 > p_max_attempts THEN p_now END,
            error = CASE WHEN q.attempts + 1 > p_max_attempts
                         THEN format('dead-lettered after %s failed attempts (last: %s)', q.attempts + 1, p_reason)
                         ELSE q.error END,
            claimed_by = NULL, claimed_at = NULL, progress_at = NULL, pane_id = NULL
        FROM cand
        WHERE q.task_id = cand.task_id
        RETURNING q.task_id, q.status, q.attempts, cand.claimed_by AS previous_claimer
    ), logged AS (
        INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
        SELECT m.task_id, m.status, m.previous_claimer, p_now,
               jsonb_build_object('reason', p_reason, 'attempts', m.attempts)
        FROM moved m
    )
    SELECT (count(*) FILTER (WHERE m.status = 'queued'))::integer,
           (count(*) FILTER (WHERE m.status = 'dead_letter'))::integer
    INTO requeued, dead_lettered
    FROM moved m;
END
$$;


-- One reconciler cycle: expiry, then claims of down/left machines, then orphaned claims
-- (any in-flight state), then stuck panes (injected or running), each one set-based
-- statement over its partial index; one ReconcilerRun event with the counts. An advisory
-- lock keeps two reconcilers apart so every cycle's counts are its own.
CREATE OR REPLACE FUNCTION mesh_reconcile(
    p_now timestamptz, p_orphan_seconds double precision, p_stuck_seconds double precision,
    p_expiry_seconds double precision, p_max_attempts integer)
RETURNS TABLE (orphaned_requeued integer, stuck_requeued integer, expired integer,
               dead_lettered integer, dead_machine_claims_requeued integer)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_orphan_cutoff timestamptz := p_now - make_interval(secs => p_orphan_seconds);
    v_stuck_cutoff  timestamptz := p_now - make_interval(secs => p_stuck_seconds);
    v_expiry_cutoff timestamptz := p_now - make_interval(secs => p_expiry_seconds);
    v_expired integer := 0;
    v_down_q integer := 0;  v_down_d integer := 0;
    v_orph_q integer := 0;  v_orph_d integer := 0;
    v_stuck_q integer := 0; v_stuck_d integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('mesh_reconcile'));

    -- Expiry: created before the cutoff and not finished.
    WITH cand AS (
        SELECT q.task_id, q.claimed_by FROM mesh_task_queue q
        WHERE q.status IN ('queued', 'claimed', 'injected', 'running')
          AND q.created_at < v_expiry_cutoff
        FOR UPDATE OF q SKIP LOCKED
    ), moved AS (
        UPDATE mesh_task_queue q
        SET status = 'expired', finished_at = p_now,
            error = format('expired: not finished within %s s of creation', p_expiry_seconds)
        FROM cand WHERE q.task_id = cand.task_id
        RETURNING q.task_id, q.attempts, cand.claimed_by AS previous_claimer
    ), logged AS (
        INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
        SELECT m.task_id, 'expired', m.previous_claimer, p_now,
               jsonb_build_object('reason', 'expired', 'attempts', m.attempts)
        FROM moved m
    )
    SELECT count(*) INTO v_expired FROM moved;

    -- Claims still held by machines declared down or gone (normally requeued by mark_down).
    SELECT r.requeued, r.dead_lettered INTO v_down_q, v_down_d
    FROM mesh_requeue_failed(ARRAY(
        SELECT q.task_id FROM mesh_health h
        JOIN mesh_task_queue q ON q.claimed_by = h.machine_id
        WHERE h.status IN ('down', 'left')
          AND q.status IN ('claimed', 'injected', 'running')
        FOR UPDATE OF q SKIP LOCKED
    ), p_now, p_max_attempts, 'machine_down') r;

    -- Orphaned claims: in flight, claimed before the cutoff, no progress since, claimer silent.
    SELECT r.requeued, r.dead_lettered INTO v_orph_q, v_orph_d
    FROM mesh_requeue_failed(ARRAY(
        SELECT q.task_id FROM mesh_task_queue q
        WHERE q.status IN ('claimed', 'injected', 'running')
          AND q.claimed_at < v_orphan_cutoff
          AND (q.progress_at IS NULL OR q.progress_at < v_orphan_cutoff)
          AND NOT EXISTS (
              SELECT 1 FROM mesh_health h
              WHERE h.machine_id = q.claimed_by
                AND h.status NOT IN ('down', 'left')
                AND h.last_heartbeat >= v_orphan_cutoff)
        FOR UPDATE OF q SKIP LOCKED
    ), p_now, p_max_attempts, 'orphaned') r;

    -- Stuck panes: injected or running, no pane progress since the cutoff (respawning is
    -- the agent's job).
    SELECT r.requeued, r.dead_lettered INTO v_stuck_q, v_stuck_d
    FROM mesh_requeue_failed(ARRAY(
        SELECT q.task_id FROM mesh_task_queue q
        WHERE q.status IN ('injected', 'running')
          AND COALESCE(q.progress_at, q.claimed_at) < v_stuck_cutoff
        FOR UPDATE OF q SKIP LOCKED
    ), p_now, p_max_attempts, 'stuck') r;

    orphaned_requeued := v_orph_q;
    stuck_requeued := v_stuck_q;
    expired := v_expired;
    dead_lettered := v_down_d + v_orph_d + v_stuck_d;
    dead_machine_claims_requeued := v_down_q;

    INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
    VALUES (NULL, 'ReconcilerRun', NULL, p_now, jsonb_build_object(
        'orphaned_requeued', orphaned_requeued, 'stuck_requeued', stuck_requeued,
        'expired', expired, 'dead_lettered', dead_lettered,
        'dead_machine_claims_requeued', dead_machine_claims_requeued));
    RETURN NEXT;
END
$$;


-- Access, as in 0001_pipeline.sql: row level security on with no policies, nothing for
-- PUBLIC, `anon` or `authenticated` (the keys shipped to browsers and apps); only
-- `service_role` (and the owner) read and write. A dashboard policy is a later, deliberate
-- migration.
ALTER TABLE mesh_health ENABLE ROW LEVEL SECURITY;
ALTER TABLE mesh_task_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE mesh_task_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE mesh_pane_state ENABLE ROW LEVEL SECURITY;

REVOKE ALL ON FUNCTION mesh_task_events_append_only() FROM PUBLIC;  -- fires as a trigger only
REVOKE ALL ON FUNCTION mesh_claim(text, timestamptz, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION mesh_requeue_failed(text[], timestamptz, integer, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION mesh_reconcile(timestamptz, double precision, double precision,
                                      double precision, integer) FROM PUBLIC;

DO $$
DECLARE
    v_role text;
    v_table text;
    v_function text;
    v_tables text[] := ARRAY['mesh_health', 'mesh_task_queue', 'mesh_task_events', 'mesh_pane_state'];
    v_functions text[] := ARRAY[
        'mesh_task_events_append_only()',
        'mesh_claim(text, timestamptz, integer)',
        'mesh_requeue_failed(text[], timestamptz, integer, text)',
        'mesh_reconcile(timestamptz, double precision, double precision, double precision, integer)'];
BEGIN
    -- The roles exist only on Supabase; on a plain PostgreSQL this block does nothing.
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            FOREACH v_table IN ARRAY v_tables LOOP
                EXECUTE format('REVOKE ALL ON TABLE %I FROM %I', v_table, v_role);
            END LOOP;
            EXECUTE format('REVOKE ALL ON SEQUENCE mesh_task_events_id_seq FROM %I', v_role);
            FOREACH v_function IN ARRAY v_functions LOOP
                EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', v_function, v_role);
            END LOOP;
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        FOREACH v_table IN ARRAY v_tables LOOP
            -- The event log's trigger still refuses UPDATE and DELETE.
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %I TO service_role', v_table);
        END LOOP;
        EXECUTE 'GRANT USAGE, SELECT ON SEQUENCE mesh_task_events_id_seq TO service_role';
        FOREACH v_function IN ARRAY v_functions LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', v_function);
        END LOOP;
    END IF;
END
$$;
