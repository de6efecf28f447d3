-- Durability (issue 8): heartbeat renewal of an app's claim, and the exactly-once effects
-- ledger. Re-runnable: applying this file twice in a row is a no-op. Same access rules as
-- 0001: RLS on with no policies, nothing for PUBLIC.

-- Effects ledger ---------------------------------------------------------------------------
-- One row per side effect a run started for an app (a gateway spawn or dispatch, the ship
-- upload, the guard's pre-attempt snapshot, the run marker of agent processes). The key is
-- derived from (app, stage, attempt) and never from the claim epoch, so a resumed run finds
-- the effect its dead predecessor recorded and polls it instead of starting it again.
CREATE TABLE IF NOT EXISTS app_effects (
    app_id     text COLLATE "C" NOT NULL
               CONSTRAINT app_effects_app_id_check
               CHECK (app_id ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    key        text COLLATE "C" NOT NULL,
    kind       text NOT NULL
               CONSTRAINT app_effects_kind_check
               CHECK (kind IN ('spawn', 'dispatch', 'ship', 'snapshot', 'marker')),
    value      text NOT NULL,
    epoch      bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_id, key)
);
ALTER TABLE app_effects ENABLE ROW LEVEL SECURITY;

-- Renew an app's claim (the run's heartbeat): only the holder at `p_epoch` renews, and the
-- stage is not touched. Returns false when the claim was released or a newer epoch holds the
-- app, which tells the run it has lost the app. VOLATILE: it writes.
CREATE OR REPLACE FUNCTION fleet_renew_claim(
    p_app_id text, p_epoch bigint, p_now timestamptz, p_lease_seconds double precision
)
RETURNS boolean
LANGUAGE sql VOLATILE
AS $$
    WITH renewed AS (
        UPDATE app_evolution_states
           SET lease_until = p_now + make_interval(secs => p_lease_seconds)
         WHERE app_id = p_app_id AND epoch = p_epoch AND owner IS NOT NULL
        RETURNING 1
    )
    SELECT EXISTS (SELECT 1 FROM renewed);
$$;

-- Record an effect once: the first value under (app, key) wins and is returned to every
-- later caller, so a retried or resumed spawn learns the task it already started. Fenced
-- like fleet_set_stage: a run whose epoch no longer owns the app records nothing.
-- VOLATILE: it locks and writes.
CREATE OR REPLACE FUNCTION fleet_record_effect(
    p_app_id text, p_key text, p_kind text, p_value text, p_epoch bigint, p_now timestamptz
)
RETURNS text
LANGUAGE plpgsql VOLATILE
AS $$
DECLARE
    v_row app_evolution_states;
    v_value text;
BEGIN
    -- FOR SHARE: a concurrent claim (FOR UPDATE SKIP LOCKED) skips the row meanwhile, so no
    -- claim bumps the epoch between this check and the insert.
    SELECT * INTO v_row FROM app_evolution_states WHERE app_id = p_app_id FOR SHARE;
    IF NOT FOUND OR v_row.epoch IS DISTINCT FROM p_epoch OR v_row.owner IS NULL THEN
        RAISE EXCEPTION USING
            ERRCODE = 'P0001',
            MESSAGE = format(
                'stale_lease: effect %s for %s refused: epoch %s no longer owns it '
                '(current epoch %s); another run has taken the app or the claim was released',
                p_key, p_app_id, p_epoch, coalesce(v_row.epoch::text, 'none')),
            HINT = 'stop this run; the app is owned by a newer claim';
    END IF;
    INSERT INTO app_effects (app_id, key, kind, value, epoch, created_at)
    VALUES (p_app_id, p_key, p_kind, p_value, p_epoch, p_now)
    ON CONFLICT (app_id, key) DO NOTHING;
    SELECT e.value INTO v_value FROM app_effects e WHERE e.app_id = p_app_id AND e.key = p_key;
    RETURN v_value;
END
$$;

-- Operator reset (as in 0001) now also forgets the app's effects: the next run starts its
-- spawns, snapshot and ship afresh.
CREATE OR REPLACE FUNCTION fleet_reset_app(p_app_id text, p_now timestamptz)
RETURNS void
LANGUAGE sql VOLATILE
AS $$
    DELETE FROM app_effects WHERE app_id = p_app_id;
    UPDATE app_evolution_states
       SET stage = 'queued', error = NULL, owner = NULL, lease_until = NULL,
           stage_started_at = NULL, epoch = epoch + 1, updated_at = p_now
     WHERE app_id = p_app_id;
$$;

REVOKE ALL ON TABLE app_effects FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_renew_claim(text, bigint, timestamptz, double precision) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_record_effect(text, text, text, text, bigint, timestamptz) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_reset_app(text, timestamptz) FROM PUBLIC;

DO $$
DECLARE
    v_role text;
    v_function text;
    v_functions text[] := ARRAY[
        'fleet_renew_claim(text, bigint, timestamptz, double precision)',
        'fleet_record_effect(text, text, text, text, bigint, timestamptz)'];
BEGIN
    -- The roles exist only on Supabase; on a plain PostgreSQL this block does nothing. The
    -- dashboard (0004) does not read effects: they name gateway tasks and repo paths.
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('REVOKE ALL ON TABLE app_effects FROM %I', v_role);
            FOREACH v_function IN ARRAY v_functions LOOP
                EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', v_function, v_role);
            END LOOP;
        END IF;
    END LOOP;
END
$$;
