-- The mesh store's statements on SQLite (fleet/mesh/sqlite_store.py reads them by name):
-- the twin of fleet/mesh/queries.sql and of the functions of 0002_mesh.sql, applying the
-- rules of fleet/mesh/rules.py. Every write runs inside one BEGIN IMMEDIATE transaction, so
-- the statements of one call see no other writer. Status lists are written out (the partial
-- indexes match them only as literals); tests/mesh/test_rules.py checks each one against
-- the sets of fleet/mesh/rules.py. Timestamps are fixed-width UTC ISO strings.

-- name: columns_of
SELECT name FROM pragma_table_info(:table)

-- name: add_task_claim_seq
ALTER TABLE mesh_task_queue ADD COLUMN claim_seq INTEGER NOT NULL DEFAULT 0

-- name: add_pane_claim_seq
ALTER TABLE mesh_pane_state ADD COLUMN claim_seq INTEGER

-- name: add_task_mesh_id
ALTER TABLE mesh_task_queue ADD COLUMN mesh_id TEXT

-- name: add_task_generation
ALTER TABLE mesh_task_queue ADD COLUMN generation INTEGER

-- name: add_task_type
ALTER TABLE mesh_task_queue ADD COLUMN task_type TEXT

-- name: append_event
INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
VALUES (:task_id, :event, :machine_id, :now, :detail)

-- name: lock_machine
-- Locked by the write transaction (BEGIN IMMEDIATE) it is read in.
SELECT * FROM mesh_health WHERE machine_id = :machine_id

-- name: heartbeat
INSERT INTO mesh_health (machine_id, mesh_id, role, generation, last_heartbeat, health_url,
                         active_tasks, status, failed_confirmations, status_changed_at,
                         updated_at)
VALUES (:machine_id, :mesh_id, :role, :generation, :now, :health_url, :active_tasks, 'alive',
        0, :now, :now)
ON CONFLICT (machine_id) DO UPDATE SET mesh_id = excluded.mesh_id,
    role = excluded.role, generation = excluded.generation,
    -- A heartbeat delivered late never moves the clock back.
    last_heartbeat = max(mesh_health.last_heartbeat, excluded.last_heartbeat),
    health_url = excluded.health_url, active_tasks = excluded.active_tasks,
    status_changed_at = CASE WHEN mesh_health.status <> 'alive' THEN excluded.updated_at
                             ELSE mesh_health.status_changed_at END,
    status = 'alive', failed_confirmations = 0, updated_at = excluded.updated_at

-- name: set_machine_status
UPDATE mesh_health SET status = :status, failed_confirmations = :failed_confirmations,
    updated_at = :now,
    status_changed_at = CASE WHEN status <> :status THEN :now ELSE status_changed_at END
WHERE machine_id = :machine_id
RETURNING *

-- name: mark_left
UPDATE mesh_health SET status = 'left', status_changed_at = :now, updated_at = :now
WHERE machine_id = :machine_id

-- name: mark_down
UPDATE mesh_health SET status = 'down', updated_at = :now,
    status_changed_at = CASE WHEN status <> 'down' THEN :now ELSE status_changed_at END
WHERE machine_id = :machine_id

-- name: active_of_machine
SELECT task_id FROM mesh_task_queue
WHERE claimed_by = :machine_id AND status IN ('claimed', 'injected', 'running')

-- name: requeue_left_events
-- A graceful leave: not counted as a failed attempt. Logged before the update, which
-- clears claimed_by (SQLite's RETURNING cannot see old values).
INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
SELECT task_id, 'queued', claimed_by, :now,
       json_object('reason', 'machine_left', 'attempts', attempts)
FROM mesh_task_queue WHERE task_id IN (SELECT value FROM json_each(:task_ids))

-- name: requeue_left
UPDATE mesh_task_queue SET status = 'queued', claimed_by = NULL, claimed_at = NULL,
    progress_at = NULL, pane_id = NULL
WHERE task_id IN (SELECT value FROM json_each(:task_ids))

-- name: requeue_failed_events
-- One failed attempt each: back to the queue, or dead-lettered past max_attempts
-- (rules.requeue_outcome). Logged first, as above.
INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
SELECT task_id, CASE WHEN attempts + 1 > :max_attempts THEN 'dead_letter' ELSE 'queued' END,
       claimed_by, :now, json_object('reason', :reason, 'attempts', attempts + 1)
FROM mesh_task_queue WHERE task_id IN (SELECT value FROM json_each(:task_ids))

-- name: requeue_failed
UPDATE mesh_task_queue SET attempts = attempts + 1,
    status = CASE WHEN attempts + 1 > :max_attempts THEN 'dead_letter' ELSE 'queued' END,
    finished_at = CASE WHEN attempts + 1 > :max_attempts THEN :now END,
    error = CASE WHEN attempts + 1 > :max_attempts
                 THEN 'dead-lettered after ' || (attempts + 1) || ' failed attempts (last: '
                      || :reason || ')'
                 ELSE error END,
    claimed_by = NULL, claimed_at = NULL, progress_at = NULL, pane_id = NULL
WHERE task_id IN (SELECT value FROM json_each(:task_ids))
RETURNING status

-- name: machines
SELECT * FROM mesh_health ORDER BY machine_id

-- name: enqueue
INSERT INTO mesh_task_queue (task_id, kind, command, target, model, status, created_at,
                             task_type, mesh_id, generation)
VALUES (:task_id, :kind, :command, :target, :model, 'queued', :now,
        :task_type, :mesh_id, :generation)
ON CONFLICT (task_id) DO NOTHING
RETURNING task_id

-- name: claim_refused
-- The twin of mesh_claim's guard: a machine whose row says down/left, or a viewer, gets nothing.
SELECT 1 FROM mesh_health
WHERE machine_id = :machine_id AND (status IN ('down', 'left') OR role = 'viewer')

-- name: claim
UPDATE mesh_task_queue SET status = 'claimed', claimed_by = :machine_id, claimed_at = :now,
    claim_seq = claim_seq + 1, progress_at = NULL, pane_id = NULL
WHERE task_id IN (
    SELECT task_id FROM mesh_task_queue
    WHERE status = 'queued' AND (target IS NULL OR target = :machine_id)
    ORDER BY created_at, task_id LIMIT :limit
)
RETURNING *

-- name: claim_event
INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
VALUES (:task_id, 'claimed', :machine_id, :now, :detail)

-- name: transition
UPDATE mesh_task_queue SET status = :status, progress_at = :now,
    pane_id = COALESCE(:pane_id, pane_id), output = COALESCE(:output, output),
    error = COALESCE(:error, error), finished_at = COALESCE(:finished_at, finished_at)
WHERE task_id = :task_id AND claimed_by = :machine_id
  AND status IN ('claimed', 'injected', 'running')
  AND (:claim IS NULL OR claim_seq = :claim)
RETURNING pane_id

-- name: progress
UPDATE mesh_task_queue SET progress_at = :now
WHERE task_id = :task_id AND claimed_by = :machine_id
  AND status IN ('claimed', 'injected', 'running')
  AND (:claim IS NULL OR claim_seq = :claim)
RETURNING task_id

-- name: handoff
UPDATE mesh_task_queue SET status = 'queued', checkpoint = :checkpoint, claimed_by = NULL,
    claimed_at = NULL, progress_at = NULL, pane_id = NULL
WHERE task_id = :task_id AND claimed_by = :machine_id
  AND status IN ('claimed', 'injected', 'running')
  AND (:claim IS NULL OR claim_seq = :claim)
RETURNING attempts

-- name: get_task
SELECT * FROM mesh_task_queue WHERE task_id = :task_id

-- name: tasks_of
SELECT * FROM mesh_task_queue
WHERE claimed_by = :machine_id AND status IN ('claimed', 'injected', 'running')
ORDER BY claimed_at, task_id

-- name: events
SELECT * FROM mesh_task_events
WHERE (:task_id IS NULL OR task_id = :task_id) AND (:event IS NULL OR event = :event)
ORDER BY id

-- name: queue_depth
SELECT status, COUNT(*) AS n FROM mesh_task_queue GROUP BY status

-- name: oldest_queued
SELECT MIN(created_at) AS t FROM mesh_task_queue WHERE status = 'queued'

-- name: reconcile_expired
-- rules.Verdict.EXPIRED: created before the expiry cutoff and not finished.
SELECT task_id FROM mesh_task_queue
WHERE status IN ('queued', 'claimed', 'injected', 'running') AND created_at < :expiry

-- name: expire_events
INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
SELECT task_id, 'expired', claimed_by, :now,
       json_object('reason', 'expired', 'attempts', attempts)
FROM mesh_task_queue WHERE task_id IN (SELECT value FROM json_each(:task_ids))

-- name: expire
UPDATE mesh_task_queue SET status = 'expired', finished_at = :now, error = :error
WHERE task_id IN (SELECT value FROM json_each(:task_ids))

-- name: reconcile_machine_down
-- rules.Verdict.MACHINE_DOWN: active, and the claimer is declared down or left.
SELECT task_id FROM mesh_task_queue
WHERE status IN ('claimed', 'injected', 'running')
  AND claimed_by IN (SELECT machine_id FROM mesh_health WHERE status IN ('down', 'left'))

-- name: reconcile_orphaned
-- rules.Verdict.ORPHANED: in flight past the claimer's orphan cutoff (its own in the JSON
-- object :orphan_by_machine when it runs a canary policy, else :orphan), no progress since,
-- and the claimer has no fresh heartbeat (rules.claimer_heartbeat_fresh).
SELECT task_id FROM (
    SELECT q.task_id, q.claimed_by, q.claimed_at, q.progress_at,
           COALESCE((SELECT value FROM json_each(:orphan_by_machine) WHERE key = q.claimed_by),
                    :orphan) AS cutoff
    FROM mesh_task_queue q WHERE q.status IN ('claimed', 'injected', 'running')
) c
WHERE c.claimed_at < c.cutoff AND (c.progress_at IS NULL OR c.progress_at < c.cutoff)
  AND NOT EXISTS (SELECT 1 FROM mesh_health h
                  WHERE h.machine_id = c.claimed_by
                    AND h.status NOT IN ('down', 'left') AND h.last_heartbeat >= c.cutoff)

-- name: reconcile_stuck
-- rules.Verdict.STUCK: in a pane with no progress past the claimer's stuck cutoff (its own
-- in :stuck_by_machine, else :stuck).
SELECT task_id FROM mesh_task_queue q
WHERE status IN ('injected', 'running')
  AND COALESCE(progress_at, claimed_at)
      < COALESCE((SELECT value FROM json_each(:stuck_by_machine) WHERE key = q.claimed_by), :stuck)

-- name: set_pane_state
INSERT INTO mesh_pane_state (machine_id, pane_id, task_id, claim_seq, alive, context_ratio,
                             updated_at)
VALUES (:machine_id, :pane_id, :task_id,
        COALESCE(:claim, (SELECT claim_seq FROM mesh_task_queue
                          WHERE task_id = :task_id AND claimed_by = :machine_id
                            AND status IN ('claimed', 'injected', 'running'))),
        :alive, :context_ratio, :now)
ON CONFLICT (machine_id, pane_id) DO UPDATE SET
    task_id = excluded.task_id, claim_seq = excluded.claim_seq, alive = excluded.alive,
    context_ratio = excluded.context_ratio, updated_at = excluded.updated_at

-- name: pane_states
SELECT * FROM mesh_pane_state
WHERE (:machine_id IS NULL OR machine_id = :machine_id)
ORDER BY machine_id, pane_id

-- name: heartbeat_log
-- Heartbeat history (the twin of 0008_heartbeat_log.sql; the tuner's replay).
SELECT machine_id, at FROM mesh_heartbeat_log
WHERE at >= :since AND at <= :until
ORDER BY machine_id, at
