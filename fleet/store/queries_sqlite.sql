-- The pipeline store's statements on SQLite (fleet/store/sqlite.py reads them by name): the
-- twin of fleet/store/queries.sql and of the SQL functions of 0001_pipeline.sql. Writes run
-- inside one BEGIN IMMEDIATE transaction each; timestamps are UTC ISO strings.

-- name: ensure_app
INSERT INTO app_evolution_states (app_id, updated_at) VALUES (:app_id, :now)
ON CONFLICT (app_id) DO NOTHING

-- name: get_state
SELECT * FROM app_evolution_states WHERE app_id = :app_id

-- name: list_states
SELECT * FROM app_evolution_states ORDER BY app_id

-- name: others_in_flight
SELECT count(*) AS n FROM app_evolution_states
WHERE owner IS NOT NULL AND lease_until >= :now AND app_id <> :app_id

-- name: claim_app
-- Free when unowned, expired, or owned by the crashed run the caller vouches for.
UPDATE app_evolution_states SET owner = :owner, run_id = :run_id, lease_until = :until,
    epoch = epoch + 1, updated_at = :now
WHERE app_id = :app_id AND (owner IS NULL OR lease_until < :now OR owner = :steal_from)
RETURNING epoch

-- name: release_app
UPDATE app_evolution_states SET owner = NULL, lease_until = NULL
WHERE app_id = :app_id AND epoch = :epoch

-- name: claim_of
SELECT stage, epoch, owner FROM app_evolution_states WHERE app_id = :app_id

-- name: set_stage
UPDATE app_evolution_states SET stage = :stage, error = :error, updated_at = :now,
    stage_started_at = COALESCE(:started, stage_started_at),
    lease_until = COALESCE(:lease_until, lease_until)
WHERE app_id = :app_id AND epoch = :epoch
RETURNING *

-- name: renew_claim
UPDATE app_evolution_states SET lease_until = :until
WHERE app_id = :app_id AND epoch = :epoch AND owner IS NOT NULL
RETURNING epoch

-- name: reset_app_effects
DELETE FROM app_effects WHERE app_id = :app_id

-- name: reset_app
UPDATE app_evolution_states SET stage = 'queued', error = NULL, owner = NULL,
    lease_until = NULL, stage_started_at = NULL, epoch = epoch + 1, updated_at = :now
WHERE app_id = :app_id

-- name: known_task_keys
SELECT task_key FROM app_evolution_tasks
WHERE task_key IN (SELECT value FROM json_each(:task_keys))

-- name: upsert_task
INSERT INTO app_evolution_tasks (task_key, app_id, source, priority, description, severity,
                                 file, created_at, updated_at)
VALUES (:task_key, :app_id, :source, :priority, :description, :severity, :file, :now, :now)
ON CONFLICT (task_key) DO UPDATE SET priority = excluded.priority,
    severity = excluded.severity, updated_at = excluded.updated_at

-- name: list_tasks
SELECT * FROM app_evolution_tasks
WHERE app_id = :app_id AND (:source IS NULL OR source = :source)
ORDER BY priority, created_at, task_key

-- name: record_trajectory
INSERT INTO trajectories (app_id, run_id, pipeline, skill_tasks, adversarial_issues,
                          quality_score, outcome, reward, durations, error, created_at)
VALUES (:app_id, :run_id, :pipeline, :skill_tasks, :adversarial_issues, :quality_score,
        :outcome, :reward, :durations, :error, :created_at)
ON CONFLICT (app_id, run_id) DO NOTHING

-- name: list_trajectories
SELECT * FROM trajectories WHERE app_id = :app_id ORDER BY created_at, run_id

-- name: reward_means
SELECT app_id, AVG(reward) AS reward_mean FROM trajectories
WHERE app_id IN (SELECT value FROM json_each(:app_ids))
GROUP BY app_id

-- name: get_fleet_config
SELECT key, value FROM fleet_config

-- name: set_fleet_config
INSERT INTO fleet_config (key, value) VALUES (:key, :value)
ON CONFLICT (key) DO UPDATE SET value = excluded.value

-- name: record_cohort
INSERT INTO cohorts (run_id, app_ids, started_at) VALUES (:run_id, :app_ids, :now)
ON CONFLICT (run_id) DO NOTHING

-- name: finish_cohort
UPDATE cohorts SET finished_at = COALESCE(finished_at, :now) WHERE run_id = :run_id

-- name: completed_cohorts
SELECT COUNT(*) AS n FROM cohorts WHERE finished_at IS NOT NULL AND app_ids != '[]'

-- name: record_effect
-- The first value under (app_id, key) wins; the caller reads the stored one back.
INSERT INTO app_effects (app_id, key, kind, value, epoch, created_at)
VALUES (:app_id, :key, :kind, :value, :epoch, :now)
ON CONFLICT (app_id, key) DO NOTHING

-- name: get_effect
SELECT * FROM app_effects WHERE app_id = :app_id AND key = :key

-- name: list_effects
SELECT * FROM app_effects WHERE app_id = :app_id ORDER BY created_at, key

-- name: acquire_lease
-- The twin of fleet_acquire_lease (0001): taken when free or expired, renewed by its holder;
-- the epoch grows whenever the holder changes.
INSERT INTO fleet_leases AS l (name, holder, epoch, acquired_at, renewed_at, expires_at)
VALUES (:name, :holder, 1, :now, :now, :until)
ON CONFLICT (name) DO UPDATE
   SET holder = excluded.holder,
       epoch = CASE WHEN l.holder = excluded.holder THEN l.epoch ELSE l.epoch + 1 END,
       acquired_at = CASE WHEN l.holder = excluded.holder THEN l.acquired_at ELSE :now END,
       renewed_at = :now,
       expires_at = excluded.expires_at
 WHERE l.holder = excluded.holder OR l.expires_at < :now
RETURNING epoch

-- name: release_lease
UPDATE fleet_leases SET expires_at = :expired, renewed_at = :now
WHERE name = :name AND holder = :holder AND epoch = :epoch
RETURNING 1 AS released

-- name: get_lease
SELECT * FROM fleet_leases WHERE name = :name

-- name: record_work
INSERT INTO work_ledger (id, app_id, run_id, stage, task_key, account, outcome, wall_seconds,
                         tokens_in, tokens_out, cost_usd, recorded_at)
VALUES (:id, :app_id, :run_id, :stage, :task_key, :account, :outcome, :wall_seconds,
        :tokens_in, :tokens_out, :cost_usd, :recorded_at)
ON CONFLICT (id) DO NOTHING

-- name: work_totals
-- The twin of fleet_work_totals (0007).
SELECT CASE :by WHEN 'app' THEN app_id WHEN 'run' THEN run_id ELSE account END AS key,
       COUNT(DISTINCT app_id || char(0) || task_key) AS tasks,
       COUNT(*) AS attempts,
       SUM(wall_seconds) AS wall_seconds,
       SUM(tokens_in) AS tokens_in,
       SUM(tokens_out) AS tokens_out,
       SUM(cost_usd) AS cost_usd
  FROM work_ledger
 WHERE :by IN ('app', 'run', 'account') AND (:since IS NULL OR recorded_at >= :since)
   AND (:run_id IS NULL OR run_id = :run_id)
 GROUP BY 1
 ORDER BY 1

-- name: open_cohort_spend
-- The twin of fleet_open_cohort_spend (0007).
SELECT COALESCE(SUM(cost_usd), 0.0) AS spent FROM work_ledger
 WHERE recorded_at > COALESCE(
           (SELECT MAX(finished_at) FROM cohorts
             WHERE finished_at IS NOT NULL AND app_ids != '[]'), '')
