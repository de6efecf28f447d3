-- Pipeline schema (DESIGN §3-§4): app stages and claims, tasks, trajectories, fleet config,
-- cohorts, and the leadership lease; plus the functions that make claims and stage writes
-- atomic and fenced. Re-runnable: applying this file twice in a row is a no-op.
--
-- Access: nothing is granted to PUBLIC, `anon` or `authenticated`. Row level security is
-- on with no policies, so on Supabase only `service_role` (which bypasses RLS) and the
-- table owner read or write. A read-only dashboard gets its own policy, e.g.
--   CREATE POLICY dashboard_read ON app_evolution_states FOR SELECT TO authenticated USING (true);
-- and `GRANT SELECT ... TO authenticated` — add that in a later migration, deliberately.

-- App states and claims ------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS app_evolution_states (
    -- COLLATE "C": ids order byte-wise, as in the SQLite store and for every client.
    app_id           text COLLATE "C" PRIMARY KEY
                     CONSTRAINT app_evolution_states_app_id_check
                     CHECK (app_id ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    stage            text NOT NULL DEFAULT 'queued'
                     CONSTRAINT app_evolution_states_stage_check
                     CHECK (stage IN ('queued', 'skillRunning', 'skillComplete',
                                      'adversarialRunning', 'adversarialComplete',
                                      'hydraBuild', 'complete', 'failed')),
    error            text,
    -- Claim epoch: bumped by every claim and reset; a stage write must carry the current one.
    epoch            bigint NOT NULL DEFAULT 0,
    owner            text,
    run_id           text,
    lease_until      timestamptz,
    stage_started_at timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now()
);
-- Cohort selection and dashboards filter on stage.
CREATE INDEX IF NOT EXISTS app_evolution_states_stage ON app_evolution_states (stage);
-- Finding expired claims (reconciler, `fleet status`) scans only held rows.
CREATE INDEX IF NOT EXISTS app_evolution_states_lease
    ON app_evolution_states (lease_until) WHERE owner IS NOT NULL;

-- Tasks ----------------------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS app_evolution_tasks (
    -- Task.key: sha256 of app, source, file and description — the stable upsert key.
    task_key    text COLLATE "C" PRIMARY KEY,
    app_id      text COLLATE "C" NOT NULL
                CONSTRAINT app_evolution_tasks_app_id_check
                CHECK (app_id ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    source      text NOT NULL CHECK (source IN ('skill', 'adversarial')),
    priority    integer NOT NULL CHECK (priority BETWEEN 1 AND 5),
    description text NOT NULL,
    severity    text CHECK (severity IN ('critical', 'high', 'medium', 'low')),
    file        text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- list_tasks(app_id[, source]) ordered by priority.
CREATE INDEX IF NOT EXISTS app_evolution_tasks_app
    ON app_evolution_tasks (app_id, source, priority, created_at);

-- Trajectories (KARL) --------------------------------------------------------------------
CREATE TABLE IF NOT EXISTS trajectories (
    app_id             text COLLATE "C" NOT NULL
                       CONSTRAINT trajectories_app_id_check
                       CHECK (app_id ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    run_id             text NOT NULL,
    pipeline           text NOT NULL DEFAULT 'default',
    skill_tasks        integer NOT NULL DEFAULT 0,
    adversarial_issues integer NOT NULL DEFAULT 0,
    quality_score      double precision,
    outcome            text NOT NULL CHECK (outcome IN ('success', 'failure')),
    reward             double precision NOT NULL CHECK (reward BETWEEN 0 AND 1),
    durations          jsonb NOT NULL DEFAULT '{}'::jsonb,
    error              text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, run_id)
);
-- The primary key serves reward means by app_id; this one serves list_trajectories' order.
CREATE INDEX IF NOT EXISTS trajectories_app_created ON trajectories (app_id, created_at);

-- Fleet config (knobs other tools edit at run time) --------------------------------------
CREATE TABLE IF NOT EXISTS fleet_config (
    key   text PRIMARY KEY,
    value jsonb NOT NULL
);

-- Cohorts (progressive expansion counts finished, non-empty cohorts) ----------------------
CREATE TABLE IF NOT EXISTS cohorts (
    run_id      text PRIMARY KEY,
    app_ids     jsonb NOT NULL DEFAULT '[]'::jsonb,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS cohorts_finished ON cohorts (finished_at) WHERE finished_at IS NOT NULL;

-- Leadership lease (DESIGN §5): one row per lease name; epoch is the fencing token --------
CREATE TABLE IF NOT EXISTS fleet_leases (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    epoch       bigint NOT NULL DEFAULT 1,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    renewed_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
-- Standbys and the watchdog look for expired leases.
CREATE INDEX IF NOT EXISTS fleet_leases_expires ON fleet_leases (expires_at);

ALTER TABLE app_evolution_states ENABLE ROW LEVEL SECURITY;
ALTER TABLE app_evolution_tasks ENABLE ROW LEVEL SECURITY;
ALTER TABLE trajectories ENABLE ROW LEVEL SECURITY;
ALTER TABLE fleet_config ENABLE ROW LEVEL SECURITY;
ALTER TABLE cohorts ENABLE ROW LEVEL SECURITY;
ALTER TABLE fleet_leases ENABLE ROW LEVEL SECURITY;

-- Functions ------------------------------------------------------------------------------
-- All run as SECURITY INVOKER (the default): they get exactly the caller's rights.

-- The pipeline's state machine; mirrors fleet/models.py ALLOWED_TRANSITIONS (a test
-- compares the two on every pair). IMMUTABLE: a pure function of its arguments.
CREATE OR REPLACE FUNCTION fleet_stage_allowed(p_from text, p_to text)
RETURNS boolean
LANGUAGE sql IMMUTABLE
AS $$
    SELECT p_to = p_from OR CASE p_from
        WHEN 'queued'              THEN p_to IN ('skillRunning', 'failed')
        WHEN 'skillRunning'        THEN p_to IN ('skillComplete', 'failed')
        WHEN 'skillComplete'       THEN p_to IN ('adversarialRunning', 'failed')
        WHEN 'adversarialRunning'  THEN p_to IN ('adversarialComplete', 'failed')
        WHEN 'adversarialComplete' THEN p_to IN ('hydraBuild', 'failed')
        WHEN 'hydraBuild'          THEN p_to IN ('complete', 'failed')
        WHEN 'complete'            THEN p_to = 'queued'
        WHEN 'failed'              THEN p_to = 'queued'
        ELSE false
    END
$$;

-- Take an app for one run; returns the new epoch, or NULL while another run holds it.
-- A claim is free when it has no owner, its lease expired, or its owner is `p_steal_from`
-- (a crashed run the caller vouches for). FOR UPDATE SKIP LOCKED: of two concurrent
-- claimers the second skips the row the first has locked, so exactly one wins and no
-- claimer waits. With `p_max_in_flight`, the claim is also refused while that many other
-- apps hold a live claim; claimers that pass a limit take a transaction-level advisory
-- lock first, so the count and the claim are one step even across overlapping cohort runs.
-- VOLATILE: it writes (PostgREST runs non-volatile functions in read-only transactions)
-- and must never be folded or cached by the planner.
DROP FUNCTION IF EXISTS fleet_claim_app(text, text, text, timestamptz, double precision, text);
CREATE OR REPLACE FUNCTION fleet_claim_app(
    p_app_id text, p_owner text, p_run_id text, p_now timestamptz,
    p_lease_seconds double precision, p_steal_from text DEFAULT NULL,
    p_max_in_flight integer DEFAULT NULL
)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_epoch bigint;
BEGIN
    IF p_max_in_flight IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('fleet_claim_app.max_in_flight'));
        IF (SELECT count(*) FROM app_evolution_states s
             WHERE s.owner IS NOT NULL AND s.lease_until >= p_now AND s.app_id <> p_app_id)
           >= p_max_in_flight THEN
            RETURN NULL;
        END IF;
    END IF;
    WITH free AS (
        SELECT s.app_id FROM app_evolution_states s
        WHERE s.app_id = p_app_id
          AND (s.owner IS NULL OR s.lease_until < p_now OR s.owner = p_steal_from)
        FOR UPDATE SKIP LOCKED
    )
    UPDATE app_evolution_states s
       SET owner = p_owner, run_id = p_run_id,
           lease_until = p_now + make_interval(secs => p_lease_seconds),
           epoch = s.epoch + 1, updated_at = p_now
      FROM free
     WHERE s.app_id = free.app_id
    RETURNING s.epoch INTO v_epoch;
    RETURN v_epoch;
END
$$;

-- Move an app to `p_stage` if `p_epoch` still owns it, renewing the lease when asked.
-- Refusals raise P0001 with a message prefix clients map to exceptions:
--   'stale_lease: …'        another run has claimed the app since (fencing)
--   'invalid_transition: …' the state machine does not allow the move
-- Rewriting the current stage keeps stage_started_at (idempotent retries).
-- VOLATILE: it locks and writes the row.
CREATE OR REPLACE FUNCTION fleet_set_stage(
    p_app_id text, p_stage text, p_epoch bigint, p_now timestamptz,
    p_error text DEFAULT NULL, p_lease_seconds double precision DEFAULT NULL
)
RETURNS app_evolution_states
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_row app_evolution_states;
BEGIN
    SELECT * INTO v_row FROM app_evolution_states WHERE app_id = p_app_id FOR UPDATE;
    -- A released claim (owner NULL) writes nothing either: a worker thread that outlives
    -- its run must not move the stage after the run let the app go.
    IF NOT FOUND OR v_row.epoch IS DISTINCT FROM p_epoch OR v_row.owner IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0001',
            MESSAGE = format(
                'stale_lease: stage write for %s refused: epoch %s no longer owns it '
                '(current epoch %s); another run has taken the app or the claim was released',
                p_app_id, p_epoch, coalesce(v_row.epoch::text, 'none')),
            HINT = 'stop this run; the app is owned by a newer claim';
    END IF;
    IF NOT fleet_stage_allowed(v_row.stage, p_stage) THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0001',
            MESSAGE = format(
                'invalid_transition: stage %s cannot move to %s; allowed: %s',
                v_row.stage, p_stage,
                (SELECT string_agg(s, ', ' ORDER BY s COLLATE "C")
                   FROM unnest(ARRAY['queued', 'skillRunning', 'skillComplete',
                                     'adversarialRunning', 'adversarialComplete',
                                     'hydraBuild', 'complete', 'failed']) AS s
                  WHERE fleet_stage_allowed(v_row.stage, s)));
    END IF;
    UPDATE app_evolution_states
       SET stage = p_stage, error = p_error, updated_at = p_now,
           stage_started_at = CASE WHEN p_stage = v_row.stage THEN stage_started_at ELSE p_now END,
           lease_until = CASE WHEN p_lease_seconds IS NULL OR p_lease_seconds <= 0 THEN lease_until
                              ELSE p_now + make_interval(secs => p_lease_seconds) END
     WHERE app_id = p_app_id
    RETURNING * INTO v_row;
    RETURN v_row;
END
$$;

-- Operator reset: back to `queued`, error cleared, claim dropped; the epoch bump fences
-- any run still holding the old claim. VOLATILE: it writes.
CREATE OR REPLACE FUNCTION fleet_reset_app(p_app_id text, p_now timestamptz)
RETURNS void
LANGUAGE sql VOLATILE
AS $$
    UPDATE app_evolution_states
       SET stage = 'queued', error = NULL, owner = NULL, lease_until = NULL,
           stage_started_at = NULL, epoch = epoch + 1, updated_at = p_now
     WHERE app_id = p_app_id;
$$;

-- Mean reward per app that has trajectories (DISCOVER ranks on it; apps without any are
-- absent). STABLE: read-only, so PostgREST may serve it as a (retryable) GET.
CREATE OR REPLACE FUNCTION fleet_reward_means(p_app_ids text[])
RETURNS TABLE (app_id text, reward_mean double precision)
LANGUAGE sql STABLE
AS $$
    SELECT t.app_id, avg(t.reward) FROM trajectories t
     WHERE t.app_id = ANY (p_app_ids)
     GROUP BY t.app_id;
$$;

-- Acquire or renew the lease `p_name` for `p_holder`; returns the epoch (fencing token),
-- or NULL while another holder's lease is live. The epoch grows by one whenever the
-- holder changes, so a deposed leader's writes carry an older epoch than the new one's.
-- VOLATILE: it writes, and two callers at the same instant must not share a result.
CREATE OR REPLACE FUNCTION fleet_acquire_lease(
    p_name text, p_holder text, p_now timestamptz, p_lease_seconds double precision
)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_epoch bigint;
BEGIN
    INSERT INTO fleet_leases AS l (name, holder, epoch, acquired_at, renewed_at, expires_at)
    VALUES (p_name, p_holder, 1, p_now, p_now, p_now + make_interval(secs => p_lease_seconds))
    ON CONFLICT (name) DO UPDATE
       SET holder = excluded.holder,
           epoch = CASE WHEN l.holder = excluded.holder THEN l.epoch ELSE l.epoch + 1 END,
           acquired_at = CASE WHEN l.holder = excluded.holder THEN l.acquired_at ELSE p_now END,
           renewed_at = p_now,
           expires_at = excluded.expires_at
     WHERE l.holder = excluded.holder OR l.expires_at < p_now
    RETURNING l.epoch INTO v_epoch;
    RETURN v_epoch;
END
$$;

-- Give the lease up early (clean shutdown) so a standby takes over at its next retry
-- instead of after a whole lease; only the holder at `p_epoch` can. VOLATILE: it writes.
CREATE OR REPLACE FUNCTION fleet_release_lease(
    p_name text, p_holder text, p_epoch bigint, p_now timestamptz
)
RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    WITH released AS (
        UPDATE fleet_leases SET expires_at = p_now - interval '1 microsecond', renewed_at = p_now
         WHERE name = p_name AND holder = p_holder AND epoch = p_epoch
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM released);
$$;

-- Privileges: functions are executable by PUBLIC by default, and Supabase's default
-- privileges hand tables and functions to `anon` and `authenticated` (the keys shipped
-- to browsers and apps). Take all of that back; only `service_role` keeps access.
REVOKE ALL ON FUNCTION fleet_stage_allowed(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_claim_app(text, text, text, timestamptz, double precision, text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_set_stage(text, text, bigint, timestamptz, text, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_reset_app(text, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_reward_means(text[]) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_acquire_lease(text, text, timestamptz, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_release_lease(text, text, bigint, timestamptz) FROM PUBLIC;

DO $$
DECLARE
    v_role text;
    v_table text;
    v_function text;
    v_tables text[] := ARRAY['app_evolution_states', 'app_evolution_tasks', 'trajectories',
                             'fleet_config', 'cohorts', 'fleet_leases'];
    v_functions text[] := ARRAY[
        'fleet_stage_allowed(text, text)',
        'fleet_claim_app(text, text, text, timestamptz, double precision, text, integer)',
        'fleet_set_stage(text, text, bigint, timestamptz, text, double precision)',
        'fleet_reset_app(text, timestamptz)',
        'fleet_reward_means(text[])',
        'fleet_acquire_lease(text, text, timestamptz, double precision)',
        'fleet_release_lease(text, text, bigint, timestamptz)'];
BEGIN
    -- The roles exist only on Supabase; on a plain PostgreSQL this block does nothing.
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            FOREACH v_table IN ARRAY v_tables LOOP
                EXECUTE format('REVOKE ALL ON TABLE %I FROM %I', v_table, v_role);
            END LOOP;
            FOREACH v_function IN ARRAY v_functions LOOP
                EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', v_function, v_role);
            END LOOP;
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        FOREACH v_table IN ARRAY v_tables LOOP
            EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE %I TO service_role', v_table);
        END LOOP;
        FOREACH v_function IN ARRAY v_functions LOOP
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', v_function);
        END LOOP;
    END IF;
END
$$;
