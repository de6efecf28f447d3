-- The immune store's statements on PostgreSQL (fleet/mesh/immune_store.py reads them by
-- name). The claim that honours quarantines is mesh_claim of
-- supabase/migrations/0003_immune.sql. Status lists are written out; tests/mesh/test_rules.py
-- checks each one against the sets of fleet/mesh/rules.py.

-- name: immune_states
SELECT * FROM mesh_immune_state
WHERE (%(kind)s::text IS NULL OR kind = %(kind)s)
ORDER BY subject

-- name: save_immune_state
-- A claim may have picked the probe since the state was read: a save that does not know of
-- it (same exclusion, no probe) keeps it, so a second probe is never let through.
INSERT INTO mesh_immune_state (subject, kind, tier, weight, failures, successes, ejections,
                               until_at, probe_task, backoff_until, sensitivity, reason,
                               antibody, changed_at, updated_at)
VALUES (%(subject)s, %(kind)s, %(tier)s, %(weight)s, %(failures)s::jsonb,
        %(successes)s::jsonb, %(ejections)s, %(until_at)s, %(probe_task)s, %(backoff_until)s,
        %(sensitivity)s, %(reason)s, %(antibody)s, %(changed_at)s, %(updated_at)s)
ON CONFLICT (subject) DO UPDATE SET tier = excluded.tier, weight = excluded.weight,
    failures = excluded.failures, successes = excluded.successes,
    ejections = excluded.ejections, until_at = excluded.until_at,
    probe_task = CASE WHEN excluded.tier >= 2 AND excluded.probe_task IS NULL
                           AND excluded.until_at = mesh_immune_state.until_at
                      THEN mesh_immune_state.probe_task ELSE excluded.probe_task END,
    backoff_until = excluded.backoff_until, sensitivity = excluded.sensitivity,
    reason = excluded.reason, antibody = excluded.antibody, changed_at = excluded.changed_at,
    updated_at = excluded.updated_at,
    claim_credit = CASE WHEN excluded.tier = 1 THEN mesh_immune_state.claim_credit ELSE 0 END

-- name: append_immune_event
INSERT INTO mesh_immune_events (subject, action, tier, at, detail)
VALUES (%(subject)s, %(action)s, %(tier)s, %(now)s, %(detail)s)

-- name: move_cursor
INSERT INTO mesh_event_cursor AS c (name, last_event_id, updated_at)
VALUES (%(name)s, %(last_event_id)s, %(now)s)
ON CONFLICT (name) DO UPDATE SET
    last_event_id = greatest(c.last_event_id, excluded.last_event_id),
    updated_at = excluded.updated_at

-- name: lift
UPDATE mesh_immune_state SET tier = 0, weight = 1, failures = '[]'::jsonb,
    successes = '[]'::jsonb, until_at = NULL, probe_task = NULL, backoff_until = NULL,
    claim_credit = 0, reason = %(reason)s, changed_at = %(now)s, updated_at = %(now)s
WHERE subject = %(subject)s AND (tier > 0 OR backoff_until IS NOT NULL)
RETURNING subject

-- name: immune_events
SELECT id, subject, action, tier, at, detail FROM mesh_immune_events
WHERE (%(subject)s::text IS NULL OR subject = %(subject)s)
ORDER BY id

-- name: antibodies
SELECT * FROM mesh_antibodies ORDER BY signature, corrective

-- name: record_antibody
INSERT INTO mesh_antibodies AS a (signature, corrective, successes, failures, updated_at)
VALUES (%(signature)s, %(corrective)s, %(successes)s, %(failures)s, %(now)s)
ON CONFLICT (signature, corrective) DO UPDATE SET
    successes = a.successes + excluded.successes, failures = a.failures + excluded.failures,
    updated_at = excluded.updated_at

-- name: task_events_after
SELECT e.id, e.task_id, e.event, e.machine_id, e.at, e.detail, q.task_type, q.error
FROM mesh_task_events e LEFT JOIN mesh_task_queue q ON q.task_id = e.task_id
WHERE e.id > %(after_id)s
ORDER BY e.id
LIMIT %(limit)s

-- name: event_cursor
SELECT last_event_id FROM mesh_event_cursor WHERE name = %(name)s

-- name: requeue_unattempted
-- Back to the queue without counting an attempt (a rate limit), fenced like a transition.
WITH moved AS (
    UPDATE mesh_task_queue SET status = 'queued', claimed_by = NULL, claimed_at = NULL,
        progress_at = NULL, pane_id = NULL
    WHERE task_id = %(task_id)s AND claimed_by = %(machine_id)s
      AND status IN ('claimed', 'injected', 'running')
      AND (%(claim)s::integer IS NULL OR claim_seq = %(claim)s)
    RETURNING task_id, attempts
), logged AS (
    INSERT INTO mesh_task_events (task_id, event, machine_id, at, detail)
    SELECT task_id, 'queued', %(machine_id)s, %(now)s,
           jsonb_build_object('reason', 'rate_limited', 'attempts', attempts,
                              'message', left(%(message)s::text, 500))
    FROM moved
)
SELECT count(*) AS n FROM moved

-- name: record_breaker
INSERT INTO mesh_breaker_state (name, holder, state, failures, opened_at, retry_at,
                                last_error, updated_at)
VALUES (%(name)s, %(holder)s, %(state)s, %(failures)s, %(opened_at)s, %(retry_at)s,
        %(last_error)s, %(updated_at)s)
ON CONFLICT (name, holder) DO UPDATE SET state = excluded.state,
    failures = excluded.failures, opened_at = excluded.opened_at,
    retry_at = excluded.retry_at, last_error = excluded.last_error,
    updated_at = excluded.updated_at

-- name: breaker_rows
SELECT * FROM mesh_breaker_state ORDER BY name, holder
