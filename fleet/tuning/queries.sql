-- The policy store's statements on PostgreSQL (fleet/tuning/policies.py reads them by name);
-- the tables are supabase/migrations/0005_policies.sql's.

-- name: versions
SELECT * FROM mesh_policies ORDER BY version

-- name: policy
SELECT * FROM mesh_policies WHERE version = %(version)s

-- name: active
SELECT * FROM mesh_policies WHERE status = 'active'

-- name: rolled_back_versions
SELECT version FROM mesh_policies WHERE status = 'rolled_back'

-- name: trials
SELECT * FROM mesh_policy_trials ORDER BY id

-- name: assignments
SELECT machine_id, version FROM mesh_policy_assignments

-- name: log
SELECT * FROM mesh_policy_log ORDER BY id

-- name: activations
-- Every activation in order: what a rollback without a trial goes back through.
SELECT version, action FROM mesh_policy_log
WHERE action IN ('baseline', 'promote')
ORDER BY id

-- name: insert_policy
INSERT INTO mesh_policies (genes, status, offerable, figures, created_by, created_at)
VALUES (%(genes)s, %(status)s, %(offerable)s, %(figures)s, %(created_by)s, %(now)s)
RETURNING version

-- name: set_status
UPDATE mesh_policies SET status = %(status)s WHERE version = %(version)s

-- name: retire_active
UPDATE mesh_policies SET status = 'retired' WHERE status = 'active'

-- name: append_log
INSERT INTO mesh_policy_log (version, action, by_whom, at, detail)
VALUES (%(version)s, %(action)s, %(by_whom)s, %(now)s, %(detail)s)

-- name: insert_trial
INSERT INTO mesh_policy_trials (candidate, control, share, machines, started_by,
                                started_at)
VALUES (%(candidate)s, %(control)s, %(share)s, %(machines)s, %(started_by)s, %(now)s)
RETURNING id

-- name: assign
INSERT INTO mesh_policy_assignments (machine_id, version, trial_id, assigned_at)
VALUES (%(machine_id)s, %(version)s, %(trial_id)s, %(now)s)

-- name: unassign_trial
DELETE FROM mesh_policy_assignments WHERE trial_id = %(trial_id)s

-- name: end_trial
UPDATE mesh_policy_trials SET status = %(status)s, decided_at = %(now)s, decision = %(decision)s
WHERE id = %(trial_id)s
