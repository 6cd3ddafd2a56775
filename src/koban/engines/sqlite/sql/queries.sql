-- Named statements for the SQLite engine. Parameters are sqlite3's :name.
-- Times are INTEGER microseconds since the Unix epoch (UTC). :now is always bound: the wall
-- clock in production, an injected time in tests.
-- Statements that take a JobFilter hold the placeholder {where}: a condition built from bound
-- parameters only (see koban.engines.sqlite.engine.filter_clause). :limit is -1 for no limit.
-- Every write runs inside BEGIN IMMEDIATE, so one writer at a time holds the database: a
-- claim (fetch_jobs) can never hand a job to two producers, in this process or another.

-- name: has_schema_table
-- 1 if koban's schema version table exists.
SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'koban_schema';

-- name: schema_version
-- The newest applied migration.
SELECT max(version) AS version FROM koban_schema;

-- name: create_schema_table
-- The schema version table, created before any migration runs.
CREATE TABLE IF NOT EXISTS koban_schema (
    version    INTEGER PRIMARY KEY,
    applied_at INTEGER NOT NULL
               DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
);

-- name: record_migration
-- Mark one migration applied.
INSERT INTO koban_schema (version, applied_at) VALUES (:version, :now);

-- name: insert_job
-- Insert one job, unless its unique key is held by a job in one of the key's states (then
-- nothing is returned and the caller looks the holder up).
INSERT INTO koban_jobs (state, queue, worker, args, meta, tags, priority, max_attempts,
                        inserted_at, scheduled_at, unique_key, unique_states)
VALUES (:state, :queue, :worker, :args, :meta, :tags, :priority, :max_attempts,
        :now, :scheduled_at, :unique_key, :unique_states)
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND (unique_states & CASE state
    WHEN 'available' THEN 1 WHEN 'scheduled' THEN 2 WHEN 'executing' THEN 4
    WHEN 'retryable' THEN 8 WHEN 'completed' THEN 16 WHEN 'discarded' THEN 32
    WHEN 'cancelled' THEN 64 ELSE 0 END) <> 0
DO NOTHING
RETURNING *;

-- name: jobs_by_unique_key
-- The jobs currently holding the unique keys in the JSON array :keys.
SELECT * FROM koban_jobs
WHERE unique_key IN (SELECT value FROM json_each(:keys)) AND (unique_states & CASE state
    WHEN 'available' THEN 1 WHEN 'scheduled' THEN 2 WHEN 'executing' THEN 4
    WHEN 'retryable' THEN 8 WHEN 'completed' THEN 16 WHEN 'discarded' THEN 32
    WHEN 'cancelled' THEN 64 ELSE 0 END) <> 0;

-- name: get_job
-- One job by id.
SELECT * FROM koban_jobs WHERE id = :id;

-- name: list_jobs
-- Jobs matching a filter, newest first.
SELECT * FROM koban_jobs WHERE {where} ORDER BY id DESC LIMIT :limit;

-- name: cancel_jobs
-- Cancel unfinished jobs matching a filter (executing ones too: their node is signalled).
UPDATE koban_jobs SET state = 'cancelled', cancelled_at = :now
WHERE id IN (
    SELECT id FROM koban_jobs
    WHERE {where} AND state IN ('available', 'scheduled', 'executing', 'retryable')
    ORDER BY id LIMIT :limit)
RETURNING *;

-- name: retry_jobs
-- Make non-executing jobs matching a filter available now, granting one more attempt to
-- jobs that used all theirs.
UPDATE koban_jobs
SET state = 'available',
    scheduled_at = :now,
    max_attempts = max(max_attempts, attempt + 1),
    completed_at = NULL, cancelled_at = NULL, discarded_at = NULL
WHERE id IN (
    SELECT id FROM koban_jobs
    WHERE {where} AND state NOT IN ('executing', 'available')
    ORDER BY id LIMIT :limit)
RETURNING *;

-- name: delete_jobs
-- Delete non-executing jobs matching a filter.
DELETE FROM koban_jobs
WHERE id IN (
    SELECT id FROM koban_jobs WHERE {where} AND state <> 'executing' ORDER BY id LIMIT :limit)
RETURNING id;

-- name: count_by_queue_and_state
-- Job counts per queue and state.
SELECT queue, state, count(*) AS n FROM koban_jobs GROUP BY queue, state;

-- name: fetch_jobs
-- Claim up to :limit available jobs of one queue for one attempt, in priority, scheduled_at,
-- id order, never one whose attempts are used up. :attempted_by is ["node", "producer"].
UPDATE koban_jobs
SET state = 'executing',
    attempt = attempt + 1,
    attempted_at = :now,
    attempted_by = :attempted_by
WHERE id IN (
    SELECT id FROM koban_jobs INDEXED BY koban_jobs_fetch_idx
    WHERE state = 'available' AND queue = :queue AND attempt < max_attempts
    ORDER BY priority, scheduled_at, id
    LIMIT :limit)
RETURNING *;

-- name: complete_job
-- Mark a job completed, only if it is still executing the attempt that finished.
UPDATE koban_jobs SET state = 'completed', completed_at = :now
WHERE id = :id AND state = 'executing' AND attempt = :attempt;

-- name: executing_attempt
-- The meta and errors of a job still executing the given attempt, to merge an outcome into.
SELECT meta, errors FROM koban_jobs
WHERE id = :id AND state = 'executing' AND attempt = :attempt;

-- name: record_outcome
-- Record any outcome (see koban.engines.base.Ack) of the attempt still executing.
-- :meta and :errors are the merged values; :given_back is 1 for a snooze, else 0;
-- :scheduled_at is NULL unless the job runs again later.
UPDATE koban_jobs
SET state = :state,
    completed_at = CASE WHEN :state = 'completed' THEN :now ELSE completed_at END,
    cancelled_at = CASE WHEN :state = 'cancelled' THEN :now ELSE cancelled_at END,
    discarded_at = CASE WHEN :state = 'discarded' THEN :now ELSE discarded_at END,
    scheduled_at = coalesce(:scheduled_at, scheduled_at),
    attempt = attempt - :given_back,
    meta = :meta,
    errors = :errors
WHERE id = :id AND state = 'executing' AND attempt = :attempt;

-- name: stage_jobs
-- Make due scheduled and retryable jobs available; return the queue of each. The index is
-- named because without statistics SQLite may prefer koban_jobs_state_idx and sort every
-- scheduled job, due or not.
UPDATE koban_jobs SET state = 'available'
WHERE id IN (
    SELECT id FROM koban_jobs INDEXED BY koban_jobs_stage_idx
    WHERE state IN ('scheduled', 'retryable') AND scheduled_at <= :now
    ORDER BY scheduled_at, id
    LIMIT :limit)
RETURNING queue;

-- name: notify
-- Record one notification for listeners in other processes.
INSERT INTO koban_notifications (channel, payload, origin, created_at)
VALUES (:channel, :payload, :origin, :now);

-- name: prune_notifications
-- Forget notifications every listener has had ample time to poll.
DELETE FROM koban_notifications WHERE created_at < :before;

-- name: last_notification
-- The id a new listener starts after: it only wants notifications sent from now on.
SELECT coalesce(max(id), 0) AS id FROM koban_notifications;

-- name: notifications_after
-- Notifications a listener has not seen yet, oldest first.
SELECT id, channel, payload, origin FROM koban_notifications
WHERE id > :after ORDER BY id LIMIT 1000;

-- name: estimate_jobs
-- How many jobs match a filter. SQLite has no planner estimate to offer, so this counts.
SELECT count(*) AS n FROM koban_jobs WHERE {where};

-- name: throughput_completed
-- Jobs completed per minute (bucket start in microseconds) since :since.
SELECT (completed_at / 60000000) * 60000000 AS minute, count(*) AS n
FROM koban_jobs
WHERE state = 'completed' AND completed_at >= :since
GROUP BY 1;

-- name: throughput_errors
-- The errors of jobs attempted since an hour before :since: only they can hold an error
-- recorded after :since.
SELECT errors FROM koban_jobs WHERE attempted_at >= :since - 3600000000 AND errors <> '[]';
