-- The cost and work ledger: one row per try of an agent task (DISPATCH, REVIEW, SHIP) with
-- its wall time and, when the agent reported it (COST: / TOKENS: lines), tokens and dollars.
-- Rows are only ever inserted (keyed by a fresh id, so a repeated insert is a no-op); totals
-- per app, per run (the cohort run, or the app's own run when fanned out) and per account are
-- sums over them. Re-runnable like every migration here.

CREATE TABLE IF NOT EXISTS work_ledger (
    id           text PRIMARY KEY,
    app_id       text NOT NULL,
    run_id       text NOT NULL,
    stage        text NOT NULL,
    task_key     text NOT NULL,          -- the effect key of (stage, attempt): one agent task
    account      text NOT NULL DEFAULT '',
    outcome      text NOT NULL CHECK (outcome IN ('answered', 'failed')),
    wall_seconds double precision NOT NULL CHECK (wall_seconds >= 0),
    tokens_in    bigint CHECK (tokens_in >= 0),
    tokens_out   bigint CHECK (tokens_out >= 0),
    cost_usd     double precision CHECK (cost_usd >= 0),
    recorded_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS work_ledger_app ON work_ledger (app_id);
CREATE INDEX IF NOT EXISTS work_ledger_run ON work_ledger (run_id);
CREATE INDEX IF NOT EXISTS work_ledger_recorded ON work_ledger (recorded_at);
ALTER TABLE work_ledger ENABLE ROW LEVEL SECURITY;

-- Totals grouped by 'app', 'run' or 'account'; `p_since` (NULL = all) bounds recorded_at and
-- `p_run_id` (NULL = all) keeps one run's rows (a cohort's, per app).
-- tasks counts distinct agent tasks, attempts every try; tokens and cost sum what was
-- reported (NULL when nothing in the group was).
CREATE OR REPLACE FUNCTION fleet_work_totals(
    p_by text, p_since timestamptz DEFAULT NULL, p_run_id text DEFAULT NULL)
RETURNS TABLE (key text, tasks bigint, attempts bigint, wall_seconds double precision,
               tokens_in numeric, tokens_out numeric, cost_usd double precision)
LANGUAGE sql STABLE
AS $$
    SELECT CASE p_by WHEN 'app' THEN app_id WHEN 'run' THEN run_id ELSE account END AS key,
           count(DISTINCT (app_id, task_key)) AS tasks,
           count(*) AS attempts,
           sum(w.wall_seconds) AS wall_seconds,
           sum(w.tokens_in) AS tokens_in,
           sum(w.tokens_out) AS tokens_out,
           sum(w.cost_usd) AS cost_usd
      FROM work_ledger w
     WHERE p_by IN ('app', 'run', 'account')
       AND (p_since IS NULL OR w.recorded_at >= p_since)
       AND (p_run_id IS NULL OR w.run_id = p_run_id)
     GROUP BY 1
     ORDER BY 1
$$;

-- What the open cohort has spent: dollars recorded since the last non-empty cohort finished
-- (all of them before the first one). The cohort budget (cohort_budget_usd) is checked on it.
CREATE OR REPLACE FUNCTION fleet_open_cohort_spend()
RETURNS double precision
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(sum(cost_usd), 0)::double precision
      FROM work_ledger
     WHERE recorded_at > coalesce(
               (SELECT max(finished_at) FROM cohorts
                 WHERE finished_at IS NOT NULL AND app_ids <> '[]'::jsonb),
               '-infinity'::timestamptz)
$$;

REVOKE ALL ON TABLE work_ledger FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_work_totals(text, timestamptz, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION fleet_open_cohort_spend() FROM PUBLIC;

DO $$
DECLARE
    v_role text;
BEGIN
    -- The roles exist only on Supabase; on a plain PostgreSQL this block does nothing.
    FOREACH v_role IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            EXECUTE format('REVOKE ALL ON TABLE work_ledger FROM %I', v_role);
            EXECUTE format('REVOKE ALL ON FUNCTION fleet_work_totals(text, timestamptz, text) FROM %I',
                           v_role);
            EXECUTE format('REVOKE ALL ON FUNCTION fleet_open_cohort_spend() FROM %I', v_role);
        END IF;
    END LOOP;
END
$$;
