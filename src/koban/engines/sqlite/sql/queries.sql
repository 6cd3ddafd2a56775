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

-- ----- cluster -------------------------------------------------------------------------------

-- name: replace_job
-- On a unique conflict, update the chosen fields (:set_* = 1) of the existing job while it
-- has not started; a new scheduled_at also moves it between available and scheduled.
UPDATE koban_jobs
SET args = CASE WHEN :set_args THEN :args ELSE args END,
    meta = CASE WHEN :set_meta THEN :meta ELSE meta END,
    tags = CASE WHEN :set_tags THEN :tags ELSE tags END,
    priority = CASE WHEN :set_priority THEN :priority ELSE priority END,
    max_attempts = CASE WHEN :set_max_attempts THEN :max_attempts ELSE max_attempts END,
    queue = CASE WHEN :set_queue THEN :queue ELSE queue END,
    state = CASE WHEN :set_scheduled_at AND state IN ('available', 'scheduled')
                 THEN CASE WHEN :scheduled_at > :now THEN 'scheduled' ELSE 'available' END
                 ELSE state END,
    scheduled_at = CASE WHEN :set_scheduled_at THEN :scheduled_at ELSE scheduled_at END
WHERE id = :id AND state IN ('available', 'scheduled', 'retryable')
RETURNING *;

-- name: get_node
-- One registered node.
SELECT * FROM koban_nodes WHERE name = :name;

-- name: live_node_metas
-- The meta of every other node heartbeating since :since.
SELECT meta FROM koban_nodes WHERE name <> :name AND heartbeat_at > :since;

-- name: upsert_node
-- Register or refresh a node with values the caller computed.
INSERT INTO koban_nodes (name, started_at, heartbeat_at, queues, meta)
VALUES (:name, :started_at, :now, :queues, :meta)
ON CONFLICT (name) DO UPDATE SET
    started_at = excluded.started_at,
    heartbeat_at = excluded.heartbeat_at,
    queues = excluded.queues,
    meta = excluded.meta
RETURNING *;

-- name: remove_node
-- A node's clean goodbye.
DELETE FROM koban_nodes WHERE name = :name;

-- name: forget_nodes
-- Drop rows of nodes silent since before :before.
DELETE FROM koban_nodes WHERE heartbeat_at < :before;

-- name: list_nodes
-- Every registered node, marking the lease holder.
SELECT n.*, (l.node IS NOT NULL) AS leader
FROM koban_nodes AS n LEFT JOIN koban_leader AS l ON l.node = n.name
ORDER BY n.name;

-- name: set_node_meta
-- Replace one node's meta.
UPDATE koban_nodes SET meta = :meta WHERE name = :name;

-- name: node_metas
-- Every node's meta, for edits made in Python.
SELECT name, meta FROM koban_nodes;

-- name: acquire_leadership
-- Take the lease if it is free or expired, or renew our own; returns a row only on success.
INSERT INTO koban_leader (name, node, elected_at, expires_at)
VALUES ('koban', :node, :now, :expires_at)
ON CONFLICT (name) DO UPDATE SET
    node = excluded.node,
    elected_at = CASE WHEN koban_leader.node = excluded.node
                      THEN koban_leader.elected_at ELSE excluded.elected_at END,
    expires_at = excluded.expires_at
WHERE koban_leader.node = excluded.node OR koban_leader.expires_at <= excluded.elected_at
RETURNING expires_at;

-- name: resign_leadership
-- Give the lease up at once.
DELETE FROM koban_leader WHERE node = :node RETURNING node;

-- name: rescue_jobs
-- Executing jobs whose node is dead (no heartbeat since :since) or restarted since it took
-- them go back to available, or to discarded without an attempt left; each rescue is recorded.
-- A claim within the window counts as a sign of life, as on PostgreSQL (see its comment), and
-- a rescuer (:by) whose own heartbeat is older than :late rescues nothing.
UPDATE koban_jobs
SET state = CASE WHEN attempt >= max_attempts THEN 'discarded' ELSE 'available' END,
    discarded_at = CASE WHEN attempt >= max_attempts THEN :now ELSE discarded_at END,
    scheduled_at = CASE WHEN attempt >= max_attempts THEN scheduled_at ELSE :now END,
    errors = json_insert(errors, '$[#]', json_object(
        'attempt', attempt,
        'at', :at,
        'type', 'koban.Rescued',
        'message', 'node ' || coalesce(json_extract(attempted_by, '$[0]'), '?')
                   || ' stopped, or lost the database, while running this attempt; rescued',
        'traceback', NULL)),
    meta = json_set(meta, '$.rescued', coalesce(json_extract(meta, '$.rescued'), 0) + 1)
WHERE id IN (
    SELECT j.id FROM koban_jobs AS j
    WHERE j.state = 'executing'
      AND NOT EXISTS (SELECT 1 FROM koban_nodes AS me WHERE me.name = :by AND me.heartbeat_at <= :late)
      AND NOT EXISTS (
          SELECT 1 FROM koban_nodes AS n
          WHERE n.name = json_extract(j.attempted_by, '$[0]')
            AND (n.heartbeat_at > :since OR j.attempted_at > :since)
            AND n.started_at <= j.attempted_at)
    ORDER BY j.id
    LIMIT :limit)
RETURNING *;

-- name: prune_jobs
-- Delete up to :limit jobs of one finished state that finished before :before, oldest first
-- (koban_jobs_finished_idx serves it).
DELETE FROM koban_jobs
WHERE id IN (
    SELECT id FROM koban_jobs
    WHERE state = :state
      AND (CASE state WHEN 'completed' THEN completed_at WHEN 'cancelled' THEN cancelled_at
           ELSE discarded_at END) < :before
    ORDER BY (CASE state WHEN 'completed' THEN completed_at WHEN 'cancelled' THEN cancelled_at
              ELSE discarded_at END)
    LIMIT :limit);

-- name: cron_create
-- Start tracking a cron entry (no tick inserted yet; updated_at is when counting starts).
INSERT INTO koban_cron (name, expression, last_tick, updated_at)
VALUES (:name, :signature, NULL, :now)
ON CONFLICT (name) DO NOTHING;

-- name: cron_get
-- One cron entry's record (the write transaction holds the lock).
SELECT name, expression AS signature, last_tick, updated_at FROM koban_cron WHERE name = :name;

-- name: cron_reset
-- The entry's schedule changed: start counting afresh.
UPDATE koban_cron SET expression = :signature, last_tick = NULL, updated_at = :now
WHERE name = :name
RETURNING name, expression AS signature, last_tick, updated_at;

-- name: cron_advance
-- Record the newest tick handled.
UPDATE koban_cron SET last_tick = :tick, updated_at = :now WHERE name = :name;

-- name: list_cron
-- Every tracked cron entry.
SELECT name, expression AS signature, last_tick, updated_at FROM koban_cron ORDER BY name;

-- name: control_queue
-- Set a queue's cluster-wide settings; only the flagged ones change.
INSERT INTO koban_queues (name, paused, "limit", updated_at)
VALUES (:queue, coalesce(:paused, 0), :limit, :now)
ON CONFLICT (name) DO UPDATE SET
    paused = CASE WHEN :set_paused THEN excluded.paused ELSE koban_queues.paused END,
    "limit" = CASE WHEN :set_limit THEN excluded."limit" ELSE koban_queues."limit" END,
    updated_at = excluded.updated_at;

-- name: queue_settings
-- Cluster-wide queue settings.
SELECT name, paused, "limit" FROM koban_queues ORDER BY name;
