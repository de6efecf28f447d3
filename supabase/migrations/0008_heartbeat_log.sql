-- Heartbeat history for the healing tuner's replay (fleet/tuning/history.py).
--
-- mesh_health keeps each machine's last heartbeat only; the replay needs every beat of its
-- window (7 days by default) to judge a candidate's heartbeat and liveness thresholds on what
-- happened, not on beats rebuilt at a fixed period. A trigger on mesh_health logs each new
-- heartbeat and prunes that machine's entries older than 8 days (the longest window
-- `fleet ga evolve --since` replays from the log, plus a day), so the log stays bounded:
-- about 23,000 rows per machine at a 30 s heartbeat. The SQLite twin is at the end of
-- fleet/mesh/mesh_schema_sqlite.sql.
CREATE TABLE IF NOT EXISTS mesh_heartbeat_log (
    machine_id text NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (machine_id, at)
);
CREATE INDEX IF NOT EXISTS mesh_heartbeat_log_at ON mesh_heartbeat_log (at);

CREATE OR REPLACE FUNCTION mesh_heartbeat_logged() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.last_heartbeat IS DISTINCT FROM OLD.last_heartbeat THEN
        INSERT INTO mesh_heartbeat_log (machine_id, at)
        VALUES (NEW.machine_id, NEW.last_heartbeat)
        ON CONFLICT DO NOTHING;
        DELETE FROM mesh_heartbeat_log
        WHERE machine_id = NEW.machine_id AND at < NEW.last_heartbeat - interval '8 days';
    END IF;
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER mesh_heartbeat_logged
    AFTER INSERT OR UPDATE OF last_heartbeat ON mesh_health
    FOR EACH ROW EXECUTE FUNCTION mesh_heartbeat_logged();

-- Access as in 0002_mesh.sql: RLS on with no policies, nothing for PUBLIC, `anon` or
-- `authenticated`; `service_role` (Supabase only) reads and writes.
ALTER TABLE mesh_heartbeat_log ENABLE ROW LEVEL SECURITY;
REVOKE ALL ON FUNCTION mesh_heartbeat_logged() FROM PUBLIC;  -- fires as a trigger only
DO $$
DECLARE
    v_role text;
BEGIN
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('REVOKE ALL ON TABLE mesh_heartbeat_log FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON FUNCTION mesh_heartbeat_logged() FROM %I', v_role);
        END IF;
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
        EXECUTE 'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE mesh_heartbeat_log TO service_role';
    END IF;
END
$$;
