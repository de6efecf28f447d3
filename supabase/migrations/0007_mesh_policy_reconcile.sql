-- The reconciler under canary policies: each claim is judged by its claimer's thresholds.
--
-- A canary trial (0005_policies.sql) runs a candidate policy on some machines; their claims
-- are orphaned and stuck at the candidate's timeouts, everyone else's at the policy in force
-- (fleet.tuning.policies.PoliciesInForce decides which). mesh_reconcile_by_machine is
-- mesh_reconcile of 0002_mesh.sql with per-machine orphan and stuck seconds (parallel arrays:
-- p_machines[i] runs p_machine_orphan_seconds[i], p_machine_stuck_seconds[i]); a machine not
-- listed runs p_orphan_seconds / p_stuck_seconds. mesh_reconcile becomes the call with no
-- machine listed, so the rules have one SQL definition. fleet/mesh/rules.classify(…,
-- by_machine=…) is the same rule in Python, checked against this on generated rows.
CREATE OR REPLACE FUNCTION mesh_reconcile_by_machine(
    p_now timestamptz, p_orphan_seconds double precision, p_stuck_seconds double precision,
    p_expiry_seconds double precision, p_max_attempts integer,
    p_machines text[], p_machine_orphan_seconds double precision[],
    p_machine_stuck_seconds double precision[])
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
    IF cardinality(p_machines) IS DISTINCT FROM cardinality(p_machine_orphan_seconds)
       OR cardinality(p_machines) IS DISTINCT FROM cardinality(p_machine_stuck_seconds) THEN
        RAISE EXCEPTION 'mesh_reconcile_by_machine: % machines, % orphan and % stuck thresholds',
            cardinality(p_machines), cardinality(p_machine_orphan_seconds),
            cardinality(p_machine_stuck_seconds)
            USING HINT = 'give one orphan and one stuck threshold per machine listed';
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('mesh_reconcile'));

    -- Expiry: created before the cutoff and not finished (not a machine's threshold).
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

    -- Orphaned claims: in flight, claimed before the claimer's cutoff, no progress since,
    -- claimer silent since that cutoff.
    SELECT r.requeued, r.dead_lettered INTO v_orph_q, v_orph_d
    FROM mesh_requeue_failed(ARRAY(
        SELECT q.task_id FROM mesh_task_queue q
        CROSS JOIN LATERAL (
            SELECT COALESCE((
                SELECT p_now - make_interval(secs => t.seconds)
                FROM unnest(p_machines, p_machine_orphan_seconds) AS t(machine_id, seconds)
                WHERE t.machine_id = q.claimed_by LIMIT 1), v_orphan_cutoff) AS cutoff
        ) c
        WHERE q.status IN ('claimed', 'injected', 'running')
          AND q.claimed_at < c.cutoff
          AND (q.progress_at IS NULL OR q.progress_at < c.cutoff)
          AND NOT EXISTS (
              SELECT 1 FROM mesh_health h
              WHERE h.machine_id = q.claimed_by
                AND h.status NOT IN ('down', 'left')
                AND h.last_heartbeat >= c.cutoff)
        FOR UPDATE OF q SKIP LOCKED
    ), p_now, p_max_attempts, 'orphaned') r;

    -- Stuck panes: injected or running, no pane progress since the claimer's cutoff.
    SELECT r.requeued, r.dead_lettered INTO v_stuck_q, v_stuck_d
    FROM mesh_requeue_failed(ARRAY(
        SELECT q.task_id FROM mesh_task_queue q
        CROSS JOIN LATERAL (
            SELECT COALESCE((
                SELECT p_now - make_interval(secs => t.seconds)
                FROM unnest(p_machines, p_machine_stuck_seconds) AS t(machine_id, seconds)
                WHERE t.machine_id = q.claimed_by LIMIT 1), v_stuck_cutoff) AS cutoff
        ) c
        WHERE q.status IN ('injected', 'running')
          AND COALESCE(q.progress_at, q.claimed_at) < c.cutoff
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

-- The one-policy reconcile of 0002_mesh.sql, now the call with no machine on its own policy.
CREATE OR REPLACE FUNCTION mesh_reconcile(
    p_now timestamptz, p_orphan_seconds double precision, p_stuck_seconds double precision,
    p_expiry_seconds double precision, p_max_attempts integer)
RETURNS TABLE (orphaned_requeued integer, stuck_requeued integer, expired integer,
               dead_lettered integer, dead_machine_claims_requeued integer)
LANGUAGE sql VOLATILE AS $$
    SELECT * FROM mesh_reconcile_by_machine(
        p_now, p_orphan_seconds, p_stuck_seconds, p_expiry_seconds, p_max_attempts,
        '{}'::text[], '{}'::double precision[], '{}'::double precision[])
$$;

-- Access as in 0002_mesh.sql: nothing for PUBLIC, `anon` or `authenticated`; `service_role`
-- (Supabase only) executes it.
REVOKE ALL ON FUNCTION mesh_reconcile_by_machine(timestamptz, double precision,
    double precision, double precision, integer, text[], double precision[],
    double precision[]) FROM PUBLIC;
DO $$
DECLARE
    v_role text;
    v_function text := 'mesh_reconcile_by_machine(timestamptz, double precision, '
        'double precision, double precision, integer, text[], double precision[], '
        'double precision[])';
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', v_function, v_role);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', v_function);
    END IF;
END
$$;
