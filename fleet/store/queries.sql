-- The pipeline store's statements on PostgreSQL (fleet/store/postgres.py reads them by name).
-- Claims, fenced stage writes, resets, reward means and leases are the SQL functions of
-- supabase/migrations/0001_pipeline.sql (heartbeats and effects: 0006_durable.sql); these statements only call them or read and write
-- rows. Every statement is one autocommitted statement, all a transaction pooler carries.

-- name: ensure_apps
INSERT INTO app_evolution_states (app_id, updated_at)
SELECT unnest(%(app_ids)s::text[]), %(now)s
ON CONFLICT (app_id) DO NOTHING

-- name: get_state
SELECT * FROM app_evolution_states WHERE app_id = %(app_id)s

-- name: list_states
SELECT * FROM app_evolution_states ORDER BY app_id

-- name: claim_app
SELECT fleet_claim_app(%(app_id)s, %(owner)s, %(run_id)s, %(now)s, %(lease_seconds)s,
                       %(steal_from)s, %(max_in_flight)s) AS epoch

-- name: release_app
UPDATE app_evolution_states SET owner = NULL, lease_until = NULL
WHERE app_id = %(app_id)s AND epoch = %(epoch)s

-- name: set_stage
SELECT * FROM fleet_set_stage(%(app_id)s, %(stage)s, %(epoch)s, %(now)s, %(error)s,
                              %(lease_seconds)s)

-- name: reset_app
SELECT fleet_reset_app(%(app_id)s, %(now)s)

-- name: upsert_tasks
-- One row per key: ON CONFLICT cannot touch the same row twice in one statement.
-- `xmax = 0` holds for rows this statement inserted, not for rows it updated.
INSERT INTO app_evolution_tasks (task_key, app_id, source, priority, description, severity,
                                 file, created_at, updated_at)
SELECT t.task_key, t.app_id, t.source, t.priority, t.description, t.severity, t.file,
       %(now)s, %(now)s
FROM jsonb_to_recordset(%(rows)s) AS t(task_key text, app_id text, source text,
                                       priority integer, description text, severity text,
                                       file text)
ON CONFLICT (task_key) DO UPDATE SET priority = excluded.priority,
    severity = excluded.severity, updated_at = excluded.updated_at
RETURNING (xmax = 0) AS inserted

-- name: list_tasks
SELECT * FROM app_evolution_tasks
WHERE app_id = %(app_id)s AND (%(source)s::text IS NULL OR source = %(source)s)
ORDER BY priority, created_at, task_key

-- name: record_trajectory
INSERT INTO trajectories (app_id, run_id, pipeline, skill_tasks, adversarial_issues,
                          quality_score, outcome, reward, durations, error, created_at)
VALUES (%(app_id)s, %(run_id)s, %(pipeline)s, %(skill_tasks)s, %(adversarial_issues)s,
        %(quality_score)s, %(outcome)s, %(reward)s, %(durations)s, %(error)s, %(created_at)s)
ON CONFLICT (app_id, run_id) DO NOTHING

-- name: list_trajectories
SELECT * FROM trajectories WHERE app_id = %(app_id)s ORDER BY created_at, run_id

-- name: reward_means
SELECT app_id, reward_mean FROM fleet_reward_means(%(app_ids)s::text[])

-- name: get_fleet_config
SELECT key, value FROM fleet_config

-- name: set_fleet_config
INSERT INTO fleet_config (key, value)
SELECT key, value FROM jsonb_each(%(items)s)
ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- name: record_cohort
INSERT INTO cohorts (run_id, app_ids, started_at) VALUES (%(run_id)s, %(app_ids)s, %(now)s)
ON CONFLICT (run_id) DO NOTHING

-- name: finish_cohort
UPDATE cohorts SET finished_at = %(now)s WHERE run_id = %(run_id)s AND finished_at IS NULL

-- name: completed_cohorts
SELECT count(*) AS n FROM cohorts WHERE finished_at IS NOT NULL AND app_ids <> '[]'::jsonb

-- name: acquire_lease
SELECT fleet_acquire_lease(%(name)s, %(holder)s, %(now)s, %(lease_seconds)s) AS epoch

-- name: release_lease
SELECT fleet_release_lease(%(name)s, %(holder)s, %(epoch)s, %(now)s) AS released

-- name: get_lease
SELECT * FROM fleet_leases WHERE name = %(name)s

-- name: renew_claim
SELECT fleet_renew_claim(%(app_id)s, %(epoch)s, %(now)s, %(lease_seconds)s) AS renewed

-- name: record_effect
SELECT fleet_record_effect(%(app_id)s, %(key)s, %(kind)s, %(value)s, %(epoch)s, %(now)s) AS value

-- name: get_effect
SELECT * FROM app_effects WHERE app_id = %(app_id)s AND key = %(key)s

-- name: list_effects
SELECT * FROM app_effects WHERE app_id = %(app_id)s ORDER BY created_at, key

-- name: record_work
INSERT INTO work_ledger (id, app_id, run_id, stage, task_key, account, outcome, wall_seconds,
                         tokens_in, tokens_out, cost_usd, recorded_at)
VALUES (%(id)s, %(app_id)s, %(run_id)s, %(stage)s, %(task_key)s, %(account)s, %(outcome)s,
        %(wall_seconds)s, %(tokens_in)s, %(tokens_out)s, %(cost_usd)s, %(recorded_at)s)
ON CONFLICT (id) DO NOTHING

-- name: work_totals
SELECT * FROM fleet_work_totals(%(by)s, %(since)s, %(run_id)s)

-- name: open_cohort_spend
SELECT fleet_open_cohort_spend() AS spent
