-- The dashboard contract (seed 002: the Swift dashboard reads everything, enqueues, holds,
-- and marks task completion; it never writes `stage`). Re-runnable: applying this file
-- twice in a row is a no-op.
--
-- The dashboard role is Supabase's `authenticated`: the dashboard signs its operator in
-- with Supabase Auth, and PostgREST switches to `authenticated` for that user's JWT. `anon`
-- (the key anyone can read out of a shipped app) stays closed. On a plain PostgreSQL both
-- roles are created here (NOLOGIN NOINHERIT, as Supabase has them) so the contract can be
-- tested with SET ROLE.
--
-- Reads: SELECT on the pipeline's states, tasks, trajectories, cohorts and fleet config,
-- and the mesh's health, queue and task events, through row-level-security policies that
-- apply to `authenticated` only.
-- Writes: none on any table. The dashboard's only writes are these functions, SECURITY
-- DEFINER with a fixed search_path, each touching only its own columns:
--   fleet_dashboard_enqueue(app_id)         add the app (stage 'queued') or ask for a rerun
--   fleet_dashboard_hold(app_id, reason)    keep the orchestrator from starting the app
--   fleet_dashboard_mark_task_done(task_key, done)   tick (or untick) an evolution task
-- `stage` is the orchestrator's alone (fleet_set_stage, granted to service_role only); a
-- dashboard that tries UPDATE gets "permission denied".

-- Roles -----------------------------------------------------------------------------------
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN NOINHERIT', v_role);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- roles are cluster-wide: another database's migration made it first
            END;
        END IF;
    END LOOP;
END
$$;

-- Columns the dashboard writes (through the functions below) ------------------------------
-- A hold keeps DISCOVER from starting the app; a request asks for a (re)run of an app that
-- finished or failed. The orchestrator reads both and stays the only writer of `stage`.
ALTER TABLE app_evolution_states ADD COLUMN IF NOT EXISTS held_at timestamptz;
ALTER TABLE app_evolution_states ADD COLUMN IF NOT EXISTS held_by text;
ALTER TABLE app_evolution_states ADD COLUMN IF NOT EXISTS hold_reason text;
ALTER TABLE app_evolution_states ADD COLUMN IF NOT EXISTS requested_at timestamptz;
ALTER TABLE app_evolution_states ADD COLUMN IF NOT EXISTS requested_by text;
-- An upsert of a re-parsed task keeps these (the stores update priority and severity only).
ALTER TABLE app_evolution_tasks ADD COLUMN IF NOT EXISTS done_at timestamptz;
ALTER TABLE app_evolution_tasks ADD COLUMN IF NOT EXISTS done_by text;

-- Who asked: the JWT's subject under PostgREST, else the database user of the session.
CREATE OR REPLACE FUNCTION fleet_dashboard_caller()
RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT left(coalesce(
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email',
        nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub',
        session_user::text), 200);
$$;

-- Add the app to the fleet's states as 'queued', or, for an app the states already have,
-- drop its hold and ask the orchestrator for a run (it resets a finished or failed app
-- itself). VOLATILE: it writes.
CREATE OR REPLACE FUNCTION fleet_dashboard_enqueue(p_app_id text)
RETURNS app_evolution_states
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_row app_evolution_states;
BEGIN
    INSERT INTO app_evolution_states AS s (app_id, requested_at, requested_by, updated_at)
    VALUES (p_app_id, now(), fleet_dashboard_caller(), now())
    ON CONFLICT (app_id) DO UPDATE
       SET requested_at = now(), requested_by = fleet_dashboard_caller(),
           held_at = NULL, held_by = NULL, hold_reason = NULL
    RETURNING * INTO v_row;
    RETURN v_row;
END
$$;

-- Hold the app: DISCOVER starts no new run of it until it is enqueued again. A run already
-- in flight finishes (stopping it is the orchestrator's call). VOLATILE: it writes.
CREATE OR REPLACE FUNCTION fleet_dashboard_hold(p_app_id text, p_reason text DEFAULT NULL)
RETURNS app_evolution_states
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_row app_evolution_states;
BEGIN
    UPDATE app_evolution_states
       SET held_at = now(), held_by = fleet_dashboard_caller(),
           hold_reason = left(nullif(btrim(p_reason), ''), 500), requested_at = NULL,
           requested_by = NULL
     WHERE app_id = p_app_id
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0001',
            MESSAGE = format('unknown_app: %s is not in app_evolution_states', p_app_id),
            HINT = 'enqueue the app first';
    END IF;
    RETURN v_row;
END
$$;

-- Mark an evolution task done (or not done again, with p_done false). VOLATILE: it writes.
CREATE OR REPLACE FUNCTION fleet_dashboard_mark_task_done(p_task_key text, p_done boolean DEFAULT true)
RETURNS app_evolution_tasks
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = public, pg_temp
AS $$
DECLARE
    v_row app_evolution_tasks;
BEGIN
    UPDATE app_evolution_tasks
       SET done_at = CASE WHEN p_done THEN coalesce(done_at, now()) END,
           done_by = CASE WHEN p_done THEN coalesce(done_by, fleet_dashboard_caller()) END,
           updated_at = now()
     WHERE task_key = p_task_key
    RETURNING * INTO v_row;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0001',
            MESSAGE = format('unknown_task: %s is not in app_evolution_tasks', p_task_key);
    END IF;
    RETURN v_row;
END
$$;

-- Privileges -------------------------------------------------------------------------------
REVOKE ALL ON FUNCTION fleet_dashboard_caller() FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_dashboard_enqueue(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_dashboard_hold(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_dashboard_mark_task_done(text, boolean) FROM PUBLIC;

DO $$
DECLARE
    v_table text;
    v_function text;
    v_tables text[] := ARRAY['app_evolution_states', 'app_evolution_tasks', 'trajectories',
                             'fleet_config', 'cohorts', 'mesh_health', 'mesh_task_queue',
                             'mesh_task_events'];
    v_functions text[] := ARRAY[
        'fleet_dashboard_enqueue(text)',
        'fleet_dashboard_hold(text, text)',
        'fleet_dashboard_mark_task_done(text, boolean)'];
BEGIN
    EXECUTE 'GRANT USAGE ON SCHEMA public TO authenticated';
    FOREACH v_table IN ARRAY v_tables LOOP
        -- Read only: whatever an earlier grant (Supabase's default privileges) left is taken
        -- back first, so the dashboard can never write a row directly.
        EXECUTE format('REVOKE ALL ON TABLE %I FROM authenticated', v_table);
        EXECUTE format('GRANT SELECT ON TABLE %I TO authenticated', v_table);
        EXECUTE format('DROP POLICY IF EXISTS fleet_dashboard_read ON %I', v_table);
        EXECUTE format(
            'CREATE POLICY fleet_dashboard_read ON %I FOR SELECT TO authenticated USING (true)',
            v_table);
    END LOOP;
    FOREACH v_function IN ARRAY v_functions LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM anon', v_function);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO authenticated', v_function);
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', v_function);
        END IF;
    END LOOP;
    EXECUTE 'REVOKE ALL ON FUNCTION fleet_dashboard_caller() FROM anon, authenticated';
END
$$;

-- PostgREST caches the schema: have it pick up the new functions and columns now (delivered at
-- commit; nobody listens on a plain PostgreSQL).
NOTIFY pgrst, 'reload schema';
