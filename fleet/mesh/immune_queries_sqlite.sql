-- The immune store's statements on SQLite (fleet/mesh/immune_store.py reads them by name):
-- the twin of fleet/mesh/immune_queries.sql and of mesh_claim in
-- supabase/migrations/0003_immune.sql. Every write runs inside one BEGIN IMMEDIATE
-- transaction. Status lists are written out; tests/mesh/test_rules.py checks each one
-- against the sets of fleet/mesh/rules.py. Timestamps are fixed-width UTC ISO strings.

-- name: claimer
SELECT mesh_id, generation, role, status FROM mesh_health WHERE machine_id = :machine_id

-- name: immune_state
SELECT * FROM mesh_immune_state WHERE subject = :subject

-- name: set_claim_credit
UPDATE mesh_immune_state SET claim_credit = :credit WHERE subject = :subject

-- name: claim
-- The oldest queued tasks this machine may take: none of a hard-quarantined task type
-- unless its quarantine is due and the task is that type's oldest (its probe).
UPDATE mesh_task_queue SET status = 'claimed', claimed_by = :machine_id, claimed_at = :now,
    claim_seq = claim_seq + 1, progress_at = NULL, pane_id = NULL
WHERE task_id IN (
    SELECT q.task_id FROM mesh_task_queue q
    WHERE q.status = 'queued'
      AND (q.target IS NULL OR q.target = :machine_id)
      AND (q.mesh_id IS NULL OR q.mesh_id = :mesh_id)
      AND (q.generation IS NULL OR q.generation = :generation)
      AND NOT EXISTS (
          SELECT 1 FROM mesh_immune_state s
          WHERE s.subject = 'task_type:' || q.task_type AND s.tier >= 2
            AND (s.probe_task IS NOT NULL OR s.until_at IS NULL OR s.until_at > :now))
      AND (NOT EXISTS (
               SELECT 1 FROM mesh_immune_state s
               WHERE s.subject = 'task_type:' || q.task_type AND s.tier >= 2)
           OR q.task_id = (
               SELECT q2.task_id FROM mesh_task_queue q2
               WHERE q2.status = 'queued' AND q2.task_type = q.task_type
               ORDER BY q2.created_at, q2.task_id LIMIT 1))
    ORDER BY q.created_at, q.task_id
    LIMIT :limit
)
RETURNING *

-- name: set_type_probe
-- A due, hard-quarantined task type: the claimed row is its probe.
UPDATE mesh_immune_state SET probe_task = :task_id, updated_at = :now
WHERE subject = :subject AND tier >= 2 AND probe_task IS NULL

-- name: set_machine_probe
UPDATE mesh_immune_state SET probe_task = :task_id, updated_at = :now WHERE subject = :subject

-- name: immune_states
SELECT * FROM mesh_immune_state
WHERE (:kind IS NULL OR kind = :kind)
ORDER BY subject

-- name: save_immune_state
-- A claim may have picked the probe since the state was read: a save that does not know of
-- it (same exclusion, no probe) keeps it, so a second probe is never let through.
INSERT INTO mesh_immune_state (subject, kind, tier, weight, failures, successes, ejections,
                               until_at, probe_task, backoff_until, sensitivity, reason,
                               antibody, changed_at, updated_at)
VALUES (:subject, :kind, :tier, :weight, :failures, :successes, :ejections, :until_at,
        :probe_task, :backoff_until, :sensitivity, :reason, :antibody, :changed_at,
        :updated_at)
ON CONFLICT (subject) DO UPDATE SET tier = excluded.tier, weight = excluded.weight,
    failures = excluded.failures, successes = excluded.successes,
    ejections = excluded.ejections, until_at = excluded.until_at,
    probe_task = CASE WHEN excluded.tier >= 2 AND excluded.probe_task IS NULL
                           AND excluded.until_at = mesh_immune_state.until_at
                      THEN mesh_immune_state.probe_task ELSE excluded.probe_task END,
    backoff_until = excluded.backoff_until, sensitivity = excluded.sensitivity,
    reason = excluded.reason, antibody = excluded.antibody, changed_at = excluded.changed_at,
    updated_at = excluded.updated_at,
    claim_credit = CASE WHEN excluded.tier = 1 THEN claim_credit ELSE 0 END

-- name: append_immune_event
INSERT INTO mesh_immune_events (subject, action, tier, at, detail)
VALUES (:subject, :action, :tier, :now, :detail)

-- name: move_cursor
INSERT INTO mesh_event_cursor (name, last_event_id, updated_at)
VALUES (:name, :last_event_id, :now)
ON CONFLICT (name) DO UPDATE SET
    last_event_id = max(mesh_event_cursor.last_event_id, excluded.last_event_id),
    updated_at = excluded.updated_at

-- name: lift
UPDATE mesh_immune_state SET tier = 0, weight = 1, failures = '[]', successes = '[]',
    until_at = NULL, probe_task = NULL, backoff_until = NULL, claim_credit = 0,
    reason = :reason, changed_at = :now, updated_at = :now
WHERE subject = :subject AND (tier > 0 OR backoff_until IS NOT NULL)
RETURNING subject

-- name: immune_events
SELECT * FROM mesh_immune_events
WHERE (:subject IS NULL OR subject = :subject)
ORDER BY id

-- name: antibodies
SELECT * FROM mesh_antibodies ORDER BY signature, corrective

-- name: record_antibody
INSERT INTO mesh_antibodies (signature, corrective, successes, failures, updated_at)
VALUES (:signature, :corrective, :successes, :failures, :now)
ON CONFLICT (signature, corrective) DO UPDATE SET
    successes = successes + excluded.successes, failures = failures + excluded.failures,
    updated_at = excluded.updated_at

-- name: task_events_after
SELECT e.id, e.task_id, e.event, e.machine_id, e.at, e.detail, q.task_type, q.error
FROM mesh_task_events e LEFT JOIN mesh_task_queue q ON q.task_id = e.task_id
WHERE e.id > :after_id
ORDER BY e.id
LIMIT :limit

-- name: event_cursor
SELECT last_event_id FROM mesh_event_cursor WHERE name = :name

-- name: requeue_unattempted
-- Back to the queue without counting an attempt (a rate limit), fenced like a transition.
UPDATE mesh_task_queue SET status = 'queued', claimed_by = NULL, claimed_at = NULL,
    progress_at = NULL, pane_id = NULL
WHERE task_id = :task_id AND claimed_by = :machine_id
  AND status IN ('claimed', 'injected', 'running')
  AND (:claim IS NULL OR claim_seq = :claim)
RETURNING attempts

-- name: record_breaker
INSERT INTO mesh_breaker_state (name, holder, state, failures, opened_at, retry_at,
                                last_error, updated_at)
VALUES (:name, :holder, :state, :failures, :opened_at, :retry_at, :last_error, :updated_at)
ON CONFLICT (name, holder) DO UPDATE SET state = excluded.state,
    failures = excluded.failures, opened_at = excluded.opened_at,
    retry_at = excluded.retry_at, last_error = excluded.last_error,
    updated_at = excluded.updated_at

-- name: breaker_rows
SELECT * FROM mesh_breaker_state ORDER BY name, holder
