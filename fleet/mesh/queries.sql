-- The mesh store's statements on PostgreSQL (fleet/mesh/pg_store.py reads them by name).
-- Claim, reconcile and the failed-attempt requeue are the SQL functions of
-- supabase/migrations/0002_mesh.sql. Status lists are written out (the partial indexes
-- match them only as literals); tests/mesh/test_rules.py checks each one against the sets
-- of fleet/mesh/rules.py. An agent's write names the claim it holds (fencing):
-- `%(claim)s::integer IS NULL OR claim_seq = %(claim)s`, NULL meaning any claim of the machine.

-- name: append_event
INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
VALUES (%(task_id)s, %(event)s, %(machine_id)s, %(now)s, %(detail)s)

-- name: lock_machine
SELECT * FROM mesh_health WHERE machine_id = %(machine_id)s FOR UPDATE

-- name: heartbeat
INSERT INTO mesh_health AS h (machine_id, mesh_id, role, generation, last_heartbeat,
                              health_url, active_tasks, status, failed_confirmations,
                              status_changed_at, updated_at)
VALUES (%(machine_id)s, %(mesh_id)s, %(role)s, %(generation)s, %(now)s, %(health_url)s,
        %(active_tasks)s, 'alive', 0, %(now)s, %(now)s)
ON CONFLICT (machine_id) DO UPDATE SET mesh_id = excluded.mesh_id,
    role = excluded.role, generation = excluded.generation,
    -- A heartbeat delivered late never moves the clock back.
    last_heartbeat = greatest(h.last_heartbeat, excluded.last_heartbeat),
    health_url = excluded.health_url, active_tasks = excluded.active_tasks,
    status_changed_at = CASE WHEN h.status <> 'alive' THEN excluded.updated_at
                             ELSE h.status_changed_at END,
    status = 'alive', failed_confirmations = 0, updated_at = excluded.updated_at

-- name: set_machine_status
UPDATE mesh_health SET status = %(status)s, failed_confirmations = %(failed_confirmations)s,
    updated_at = %(now)s,
    status_changed_at = CASE WHEN status <> %(status)s THEN %(now)s ELSE status_changed_at END
WHERE machine_id = %(machine_id)s
RETURNING *

-- name: mark_left
UPDATE mesh_health SET status = 'left', status_changed_at = %(now)s, updated_at = %(now)s
WHERE machine_id = %(machine_id)s

-- name: mark_down
UPDATE mesh_health SET status = 'down', updated_at = %(now)s,
    status_changed_at = CASE WHEN status <> 'down' THEN %(now)s ELSE status_changed_at END
WHERE machine_id = %(machine_id)s

-- name: requeue_on_leave
-- A graceful leave: the machine's active claims go back to the queue, not counted as failures.
WITH cand AS (
    SELECT task_id, claimed_by FROM mesh_task_queue
    WHERE claimed_by = %(machine_id)s AND status IN ('claimed', 'injected', 'running')
    FOR UPDATE
), moved AS (
    UPDATE mesh_task_queue q SET status = 'queued', claimed_by = NULL, claimed_at = NULL,
        progress_at = NULL, pane_id = NULL
    FROM cand WHERE q.task_id = cand.task_id
    RETURNING q.task_id, q.attempts, cand.claimed_by
), logged AS (
    INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
    SELECT task_id, 'queued', claimed_by, %(now)s,
           jsonb_build_object('reason', 'machine_left', 'attempts', attempts)
    FROM moved
)
SELECT count(*) AS n FROM moved

-- name: requeue_on_down
-- Each active claim of a machine declared down is one failed attempt. Rows another session
-- holds right now are left to the reconciler's down-machine rule.
SELECT * FROM mesh_requeue_failed(
    ARRAY(SELECT task_id FROM mesh_task_queue
          WHERE claimed_by = %(machine_id)s AND status IN ('claimed', 'injected', 'running')
          FOR UPDATE SKIP LOCKED),
    %(now)s, %(max_attempts)s, 'machine_down')

-- name: machines
SELECT * FROM mesh_health ORDER BY machine_id

-- name: enqueue
WITH added AS (
    INSERT INTO mesh_task_queue (task_id, kind, command, target, model, status, created_at,
                                 task_type, mesh_id, generation)
    VALUES (%(task_id)s, %(kind)s, %(command)s, %(target)s, %(model)s, 'queued', %(now)s,
            %(task_type)s, %(mesh_id)s, %(generation)s)
    ON CONFLICT (task_id) DO NOTHING
    RETURNING task_id
)
INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
SELECT task_id, 'queued', NULL, %(now)s,
       jsonb_build_object('kind', %(kind)s::text, 'target', %(target)s::text)
FROM added

-- name: claim
SELECT * FROM mesh_claim(%(machine_id)s, %(now)s, %(limit)s)

-- name: transition
WITH moved AS (
    UPDATE mesh_task_queue SET status = %(status)s, progress_at = %(now)s,
        pane_id = COALESCE(%(pane_id)s, pane_id), output = COALESCE(%(output)s, output),
        error = COALESCE(%(error)s, error),
        finished_at = CASE WHEN %(finished)s THEN %(now)s ELSE finished_at END
    WHERE task_id = %(task_id)s AND claimed_by = %(machine_id)s
      AND status IN ('claimed', 'injected', 'running')
      AND (%(claim)s::integer IS NULL OR claim_seq = %(claim)s)
    RETURNING task_id, pane_id
), logged AS (
    INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
    SELECT task_id, %(status)s, %(machine_id)s, %(now)s, jsonb_strip_nulls(jsonb_build_object(
        'pane_id', pane_id, 'error', left(%(error)s::text, 500)))
    FROM moved
)
SELECT count(*) AS n FROM moved

-- name: progress
WITH moved AS (
    UPDATE mesh_task_queue SET progress_at = %(now)s
    WHERE task_id = %(task_id)s AND claimed_by = %(machine_id)s
      AND status IN ('claimed', 'injected', 'running')
      AND (%(claim)s::integer IS NULL OR claim_seq = %(claim)s)
    RETURNING task_id
), logged AS (
    INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
    SELECT task_id, 'Progress', %(machine_id)s, %(now)s,
           jsonb_build_object('note', left(%(note)s::text, 2000))
    FROM moved WHERE %(note)s::text IS NOT NULL
)
SELECT count(*) AS n FROM moved

-- name: handoff
WITH moved AS (
    UPDATE mesh_task_queue SET status = 'queued', checkpoint = %(checkpoint)s,
        claimed_by = NULL, claimed_at = NULL, progress_at = NULL, pane_id = NULL
    WHERE task_id = %(task_id)s AND claimed_by = %(machine_id)s
      AND status IN ('claimed', 'injected', 'running')
      AND (%(claim)s::integer IS NULL OR claim_seq = %(claim)s)
    RETURNING task_id, attempts
), logged AS (
    INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
    SELECT task_id, 'Handoff', %(machine_id)s, %(now)s, jsonb_build_object(
        'status', 'queued', 'attempts', attempts,
        'checkpoint_chars', length(%(checkpoint)s::text))
    FROM moved
)
SELECT count(*) AS n FROM moved

-- name: get_task
SELECT * FROM mesh_task_queue WHERE task_id = %(task_id)s

-- name: tasks_of
SELECT * FROM mesh_task_queue
WHERE claimed_by = %(machine_id)s AND status IN ('claimed', 'injected', 'running')
ORDER BY claimed_at, task_id

-- name: events
SELECT * FROM mesh_task_events
WHERE (%(task_id)s::text IS NULL OR task_id = %(task_id)s)
  AND (%(event)s::text IS NULL OR event = %(event)s)
ORDER BY id

-- name: queue_depth
SELECT status, count(*) AS n FROM mesh_task_queue GROUP BY status

-- name: oldest_queued
SELECT min(created_at) AS t FROM mesh_task_queue WHERE status = 'queued'

-- name: reconcile
SELECT * FROM mesh_reconcile(%(now)s, %(orphan_seconds)s, %(stuck_seconds)s,
                             %(expiry_seconds)s, %(max_attempts)s)

-- name: reconcile_by_machine
-- Machines on a canary policy judged by their own orphan and stuck seconds (0007).
SELECT * FROM mesh_reconcile_by_machine(
    %(now)s, %(orphan_seconds)s, %(stuck_seconds)s, %(expiry_seconds)s, %(max_attempts)s,
    %(machines)s::text[], %(machine_orphan_seconds)s::double precision[],
    %(machine_stuck_seconds)s::double precision[])

-- name: set_pane_state
-- The row records the claim of its task: the one given, else the task's current claim
-- held by this machine, else NULL.
INSERT INTO mesh_pane_state (machine_id, pane_id, task_id, claim_seq, alive, context_ratio,
                             updated_at)
VALUES (%(machine_id)s, %(pane_id)s, %(task_id)s,
        COALESCE(%(claim)s::integer,
                 (SELECT claim_seq FROM mesh_task_queue
                  WHERE task_id = %(task_id)s AND claimed_by = %(machine_id)s
                    AND status IN ('claimed', 'injected', 'running'))),
        %(alive)s, %(context_ratio)s, %(now)s)
ON CONFLICT (machine_id, pane_id) DO UPDATE SET
    task_id = excluded.task_id, claim_seq = excluded.claim_seq, alive = excluded.alive,
    context_ratio = excluded.context_ratio, updated_at = excluded.updated_at

-- name: pane_states
SELECT machine_id, pane_id, task_id, claim_seq, alive, context_ratio, updated_at
FROM mesh_pane_state
WHERE (%(machine_id)s::text IS NULL OR machine_id = %(machine_id)s)
ORDER BY machine_id, pane_id

-- name: heartbeat_log
-- Heartbeat history of 0008_heartbeat_log.sql (the tuner's replay).
SELECT machine_id, at FROM mesh_heartbeat_log
WHERE at >= %(since)s AND at <= %(until)s
ORDER BY machine_id, at
