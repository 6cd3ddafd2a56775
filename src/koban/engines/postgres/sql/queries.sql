-- Named statements for the PostgreSQL engine. Parameters are psycopg's %(name)s.
-- %(now)s is NULL in production (the server's clock is used) and set by tests.

-- name: insert_jobs
-- Insert a batch given as a JSON array, in input order (ids follow `ord`); skip rows whose
-- unique key is taken; wake each queue that gained available jobs with one notification.
WITH input AS (
    SELECT x.*, coalesce(%(now)s::timestamptz, now()) AS t
    FROM jsonb_to_recordset(%(jobs)s::jsonb) AS x(
        ord integer, queue text, worker text, args jsonb, meta jsonb, tags text[],
        priority smallint, max_attempts integer, scheduled_at timestamptz,
        schedule_in double precision, unique_key text, unique_states smallint)
), timed AS (
    SELECT input.*, coalesce(scheduled_at, t + make_interval(secs => coalesce(schedule_in, 0))) AS run_at
    FROM input
), inserted AS (
    INSERT INTO koban_jobs (state, queue, worker, args, meta, tags, priority, max_attempts,
                            inserted_at, scheduled_at, unique_key, unique_states)
    SELECT CASE WHEN run_at > t THEN 'scheduled' ELSE 'available' END,
           queue, worker, args, meta, tags, priority, max_attempts, t, run_at,
           unique_key, unique_states
    FROM timed
    ORDER BY ord
    ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND (unique_states & CASE state
        WHEN 'available' THEN 1 WHEN 'scheduled' THEN 2 WHEN 'executing' THEN 4
        WHEN 'retryable' THEN 8 WHEN 'completed' THEN 16 WHEN 'discarded' THEN 32
        WHEN 'cancelled' THEN 64 ELSE 0 END) <> 0
    DO NOTHING
    RETURNING *
), woken AS (
    -- %(notify)s: the queues this sender may wake now (NULL: all); see InsertNotifyThrottle.
    SELECT count(pg_notify('koban_insert', json_build_object('queue', queue)::text)) AS n
    FROM (SELECT DISTINCT queue FROM inserted
          WHERE state = 'available'
            AND (%(notify)s::text[] IS NULL OR queue = ANY(%(notify)s::text[]))) AS q
)
SELECT inserted.* FROM inserted, woken ORDER BY id;

-- name: reserve_job_ids
-- Take %(n)s ids from the jobs' id sequence for a COPY, with the insert time. The sequence is
-- looked up once (per row it would cost more than the nextval itself).
WITH seq AS MATERIALIZED (SELECT pg_get_serial_sequence('koban_jobs', 'id')::regclass AS id)
SELECT coalesce(%(now)s::timestamptz, now()) AS t,
       array(SELECT nextval(seq.id) FROM seq, generate_series(1, %(n)s)) AS ids;

-- name: copy_jobs
-- Insert jobs given row by row, every value decided by the sender (see _op_copy_jobs).
COPY koban_jobs (id, state, queue, worker, args, meta, tags, priority, max_attempts,
                 inserted_at, scheduled_at) FROM STDIN;

-- name: copy_jobs_due_now
-- copy_jobs for jobs inserted and due at the transaction's now(): the times' default.
COPY koban_jobs (id, state, queue, worker, args, meta, tags, priority, max_attempts) FROM STDIN;

-- name: jobs_by_unique_key
-- The jobs currently holding the given unique keys.
SELECT * FROM koban_jobs
WHERE unique_key = ANY(%(keys)s::text[]) AND (unique_states & CASE state
        WHEN 'available' THEN 1 WHEN 'scheduled' THEN 2 WHEN 'executing' THEN 4
        WHEN 'retryable' THEN 8 WHEN 'completed' THEN 16 WHEN 'discarded' THEN 32
        WHEN 'cancelled' THEN 64 ELSE 0 END) <> 0;

-- name: fetch_jobs
-- Claim up to %(limit)s available jobs of one queue for one attempt, skipping rows another
-- transaction holds.
WITH picked AS (
    SELECT id FROM koban_jobs
    WHERE state = 'available' AND queue = %(queue)s AND attempt < max_attempts
    ORDER BY priority, scheduled_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE koban_jobs AS j
SET state = 'executing',
    attempt = j.attempt + 1,
    attempted_at = coalesce(%(now)s::timestamptz, now()),
    attempted_by = ARRAY[%(node)s::text, %(producer)s::text]
FROM picked
WHERE j.id = picked.id
-- In the order of FETCHED_COLUMNS in engine.py; `fetched_job` turns each row into a Job and
-- decodes the JSON columns, sent as text.
RETURNING j.id, j.state, j.queue, j.worker, j.args::text, j.meta::text, j.tags,
          j.errors::text, j.priority, j.attempt, j.max_attempts, j.attempted_by,
          j.inserted_at, j.scheduled_at, j.attempted_at, j.unique_key;

-- name: complete_jobs
-- Mark jobs completed, only where they are still executing the attempt that finished.
-- `state || ''` keeps the planner off the partial indexes on state: until vacuum runs, they
-- hold an entry for every row that has left `executing`, and a bitmap scan revisits them all
-- on every ack (quadratic over a burst). The primary key finds each row directly.
UPDATE koban_jobs AS j
SET state = 'completed', completed_at = coalesce(%(now)s::timestamptz, now())
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS x(id, attempt)
WHERE j.id = x.id AND j.state || '' = 'executing' AND j.attempt = x.attempt;

-- name: ack_jobs
-- Record any outcome given as a JSON array of acks (see koban.engines.base.Ack).
WITH input AS (
    SELECT x.*, coalesce(%(now)s::timestamptz, now()) AS t
    FROM jsonb_to_recordset(%(acks)s::jsonb) AS x(
        id bigint, attempt integer, state text, delay double precision, error jsonb,
        snooze boolean, meta jsonb)
)
UPDATE koban_jobs AS j
SET state = x.state,
    completed_at = CASE WHEN x.state = 'completed' THEN x.t ELSE j.completed_at END,
    cancelled_at = CASE WHEN x.state = 'cancelled' THEN x.t ELSE j.cancelled_at END,
    discarded_at = CASE WHEN x.state = 'discarded' THEN x.t ELSE j.discarded_at END,
    scheduled_at = CASE WHEN x.delay IS NOT NULL
                        THEN x.t + make_interval(secs => x.delay) ELSE j.scheduled_at END,
    errors = CASE WHEN x.error IS NOT NULL THEN j.errors || jsonb_build_array(x.error)
                  ELSE j.errors END,
    attempt = CASE WHEN x.snooze THEN j.attempt - 1 ELSE j.attempt END,
    meta = CASE WHEN x.snooze
                THEN j.meta || coalesce(x.meta, '{}')
                     || jsonb_build_object('snoozed', coalesce((j.meta ->> 'snoozed')::int, 0) + 1)
                WHEN x.meta IS NOT NULL THEN j.meta || x.meta
                ELSE j.meta END
FROM input AS x
-- `state || ''`: by primary key, as in complete_jobs.
WHERE j.id = x.id AND j.state || '' = 'executing' AND j.attempt = x.attempt;

-- name: stage_jobs
-- Make due scheduled and retryable jobs available; return the queues that gained jobs.
WITH due AS (
    SELECT id FROM koban_jobs
    WHERE state IN ('scheduled', 'retryable')
      AND scheduled_at <= coalesce(%(now)s::timestamptz, now())
    ORDER BY scheduled_at, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), staged AS (
    UPDATE koban_jobs AS j SET state = 'available'
    FROM due WHERE j.id = due.id
    RETURNING j.queue
)
SELECT DISTINCT queue FROM staged;

-- name: notify
-- Send one notification.
SELECT pg_notify(%(channel)s, %(payload)s);

-- name: notify_inserts
-- Wake the given queues (the trailing notification for inserts the throttle held back).
SELECT count(pg_notify('koban_insert', json_build_object('queue', q)::text))
FROM unnest(%(queues)s::text[]) AS q;

-- name: count_by_queue_and_state
-- Job counts per queue and state.
SELECT queue, state, count(*) AS n FROM koban_jobs GROUP BY queue, state;

-- name: schema_version
-- The newest applied migration.
SELECT max(version) AS version FROM koban_schema;

-- name: throughput
-- Completed jobs and failed attempts per minute over the last %(minutes)s minutes, zeros
-- included. A failed attempt is an errors entry other than a cancellation; only jobs attempted
-- since shortly before the window can hold one.
WITH bounds AS (
    SELECT date_trunc('minute', coalesce(%(now)s::timestamptz, now())) AS until,
           date_trunc('minute', coalesce(%(now)s::timestamptz, now()))
               - make_interval(mins => %(minutes)s - 1) AS since
), minutes AS (
    SELECT generate_series(since, until, interval '1 minute') AS minute FROM bounds
), completed AS (
    SELECT date_trunc('minute', j.completed_at) AS minute, count(*) AS n
    FROM koban_jobs AS j, bounds
    -- The finish-time expression of koban_jobs_finished_idx, so that index finds the rows.
    WHERE j.state = 'completed'
      AND (CASE j.state WHEN 'completed' THEN j.completed_at WHEN 'cancelled' THEN j.cancelled_at
           ELSE j.discarded_at END) >= bounds.since
    GROUP BY 1
), failed AS (
    SELECT date_trunc('minute', (e ->> 'at')::timestamptz) AS minute, count(*) AS n
    FROM koban_jobs AS j, bounds, jsonb_array_elements(j.errors) AS e
    WHERE j.attempted_at >= bounds.since - interval '1 hour'
      AND j.errors <> '[]'::jsonb
      AND e ->> 'type' IS DISTINCT FROM 'koban.Cancel'
      AND (e ->> 'at')::timestamptz >= bounds.since
    GROUP BY 1
)
SELECT m.minute, coalesce(c.n, 0) AS completed, coalesce(f.n, 0) AS failed
FROM minutes AS m
LEFT JOIN completed AS c USING (minute)
LEFT JOIN failed AS f USING (minute)
ORDER BY m.minute;

-- ----- cluster -------------------------------------------------------------------------------

-- name: lock_node_registry
-- Serialise node registrations (within the caller's transaction), so two nodes starting at
-- once agree on when the cluster started. A node that vanishes between this lock and its
-- COMMIT (cut off from the network, its machine lost) must not keep it: the server would hold
-- its session, and the lock, idle in transaction until TCP noticed (hours), and every other
-- node's registration would wait. For the rest of this transaction the server ends the session
-- after 5 s idle; a live node sends its next statement at once.
SELECT pg_advisory_xact_lock(%(key)s),
       set_config('idle_in_transaction_session_timeout', '5s', true);

-- name: refresh_node
-- A registered node's heartbeat: one statement, no lock. Only the incarnation that registered
-- the row refreshes it (keeping started_at, cluster_started_at and control); no row back means
-- the node must register, again, with heartbeat_node under the registry lock.
UPDATE koban_nodes AS n
SET heartbeat_at = coalesce(%(now)s::timestamptz, now()),
    queues = %(queues)s::jsonb,
    meta = %(meta)s::jsonb || jsonb_strip_nulls(jsonb_build_object(
               'cluster_started_at', n.meta -> 'cluster_started_at',
               'control', n.meta -> 'control'))
WHERE n.name = %(name)s
  AND n.meta ->> 'incarnation' = %(meta)s::jsonb ->> 'incarnation'
RETURNING *;

-- name: heartbeat_node
-- Register or refresh a node. A new incarnation restarts its row (started_at, control); the
-- first registration inherits cluster_started_at from live nodes, or starts a new cluster.
WITH t AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
), live AS (
    SELECT min((o.meta ->> 'cluster_started_at')::timestamptz) AS started
    FROM koban_nodes AS o, t
    WHERE o.name <> %(name)s
      AND o.heartbeat_at > t.t - make_interval(secs => %(live_within)s)
      AND o.meta ? 'cluster_started_at'
)
INSERT INTO koban_nodes AS n (name, started_at, heartbeat_at, queues, meta)
SELECT %(name)s, t.t, t.t, %(queues)s::jsonb,
       %(meta)s::jsonb || jsonb_build_object('cluster_started_at', coalesce(live.started, t.t))
FROM t, live
ON CONFLICT (name) DO UPDATE SET
    heartbeat_at = excluded.heartbeat_at,
    queues = excluded.queues,
    started_at = CASE WHEN n.meta ->> 'incarnation' IS NOT DISTINCT FROM excluded.meta ->> 'incarnation'
                      THEN n.started_at ELSE excluded.started_at END,
    meta = CASE WHEN n.meta ->> 'incarnation' IS NOT DISTINCT FROM excluded.meta ->> 'incarnation'
                THEN excluded.meta || jsonb_strip_nulls(jsonb_build_object(
                         'cluster_started_at', n.meta -> 'cluster_started_at',
                         'control', n.meta -> 'control'))
                ELSE excluded.meta END
RETURNING *;

-- name: get_node
-- One registered node.
SELECT * FROM koban_nodes WHERE name = %(name)s;

-- name: remove_node
-- A node's clean goodbye.
DELETE FROM koban_nodes WHERE name = %(name)s;

-- name: forget_nodes
-- Drop rows of nodes silent for long (their jobs were rescued long ago).
DELETE FROM koban_nodes
WHERE heartbeat_at < coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(older_than)s);

-- name: list_nodes
-- Every registered node, marking the lease holder.
SELECT n.*, (l.node IS NOT NULL) AS leader
FROM koban_nodes AS n LEFT JOIN koban_leader AS l ON l.node = n.name
ORDER BY n.name;

-- name: acquire_leadership
-- Take the lease if it is free or expired, or renew our own; returns a row only on success.
WITH t AS (SELECT coalesce(%(now)s::timestamptz, now()) AS t)
INSERT INTO koban_leader AS l (name, node, elected_at, expires_at)
SELECT 'koban', %(node)s, t.t, t.t + make_interval(secs => %(lease)s) FROM t
ON CONFLICT (name) DO UPDATE SET
    node = excluded.node,
    elected_at = CASE WHEN l.node = excluded.node THEN l.elected_at ELSE excluded.elected_at END,
    expires_at = excluded.expires_at
WHERE l.node = excluded.node OR l.expires_at <= excluded.elected_at
RETURNING expires_at;

-- name: resign_leadership
-- Give the lease up at once, so another node takes over without waiting for it to expire.
DELETE FROM koban_leader WHERE node = %(node)s RETURNING node;

-- name: rescue_jobs
-- Executing jobs whose node is dead (no recent heartbeat) or restarted since it took them go
-- back to available, or to discarded when they have no attempt left; each rescue is recorded.
-- A claim is a sign of life as good as a heartbeat: a job its node claimed within the window
-- is never rescued, so a rescue judged on a stale view (a statement delayed in the network
-- past its node's return) cannot take back a job that node has just claimed. Nor does a
-- rescuer (%(by)s) whose own registered heartbeat is late as this runs: it lost the database,
-- and every node's jobs, its own among them, would look dead to it.
WITH t AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
), orphans AS (
    SELECT j.id FROM koban_jobs AS j, t
    WHERE j.state = 'executing'
      AND NOT EXISTS (
          SELECT 1 FROM koban_nodes AS me
          WHERE me.name = %(by)s::text
            AND me.heartbeat_at <= t.t - make_interval(secs => %(rescue_after)s / 2.0))
      AND NOT EXISTS (
          SELECT 1 FROM koban_nodes AS n
          WHERE n.name = j.attempted_by[1]
            AND (n.heartbeat_at > t.t - make_interval(secs => %(rescue_after)s)
                 OR j.attempted_at > t.t - make_interval(secs => %(rescue_after)s))
            AND n.started_at <= j.attempted_at)
    ORDER BY j.id
    LIMIT %(limit)s
    FOR UPDATE OF j SKIP LOCKED
)
UPDATE koban_jobs AS j
SET state = CASE WHEN j.attempt >= j.max_attempts THEN 'discarded' ELSE 'available' END,
    discarded_at = CASE WHEN j.attempt >= j.max_attempts THEN t.t ELSE j.discarded_at END,
    scheduled_at = CASE WHEN j.attempt >= j.max_attempts THEN j.scheduled_at ELSE t.t END,
    errors = j.errors || jsonb_build_array(jsonb_build_object(
        'attempt', j.attempt,
        'at', t.t,
        'type', 'koban.Rescued',
        'message', 'node ' || coalesce(j.attempted_by[1], '?')
                   || ' stopped, or lost the database, while running this attempt; rescued',
        'traceback', NULL)),
    meta = j.meta || jsonb_build_object('rescued', coalesce((j.meta ->> 'rescued')::int, 0) + 1)
FROM orphans, t
WHERE j.id = orphans.id
RETURNING j.*;

-- name: prune_jobs
-- Delete up to %(limit)s jobs of one finished state that finished before the cutoff, oldest
-- first (koban_jobs_finished_idx serves it). The literal states let a generic plan of this
-- statement prove that index's predicate too.
WITH doomed AS (
    SELECT id FROM koban_jobs
    WHERE state = %(state)s AND state IN ('completed', 'cancelled', 'discarded')
      AND (CASE state WHEN 'completed' THEN completed_at WHEN 'cancelled' THEN cancelled_at
           ELSE discarded_at END)
          < coalesce(%(now)s::timestamptz, now()) - make_interval(secs => %(max_age)s)
    ORDER BY (CASE state WHEN 'completed' THEN completed_at WHEN 'cancelled' THEN cancelled_at
              ELSE discarded_at END)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM koban_jobs AS j USING doomed WHERE j.id = doomed.id;

-- name: job_indexes
-- The jobs table's indexes, and whether each is valid (a failed concurrent reindex leaves an
-- invalid copy named *_ccnew behind).
SELECT c.relname AS name, i.indisvalid AS valid
FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
WHERE i.indrelid = 'koban_jobs'::regclass
ORDER BY c.relname;

-- name: cron_create
-- Start tracking a cron entry (no tick inserted yet; updated_at is when counting starts).
INSERT INTO koban_cron (name, expression, last_tick, updated_at)
VALUES (%(name)s, %(signature)s, NULL, coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (name) DO NOTHING;

-- name: cron_lock
-- Lock a cron entry's record for the rest of the transaction. A leader cut off before its
-- COMMIT must not keep the lock until TCP notices (hours), holding back the next leader's
-- ticks: as for lock_node_registry, the server ends a session idle 5 s in this transaction.
SELECT name, expression AS signature, last_tick, updated_at,
       set_config('idle_in_transaction_session_timeout', '5s', true) AS idle_limit
FROM koban_cron WHERE name = %(name)s FOR UPDATE;

-- name: cron_reset
-- The entry's schedule changed: start counting afresh.
UPDATE koban_cron
SET expression = %(signature)s, last_tick = NULL, updated_at = coalesce(%(now)s::timestamptz, now())
WHERE name = %(name)s
RETURNING name, expression AS signature, last_tick, updated_at;

-- name: cron_advance
-- Record the newest tick handled.
UPDATE koban_cron SET last_tick = %(tick)s, updated_at = coalesce(%(now)s::timestamptz, now())
WHERE name = %(name)s;

-- name: list_cron
-- Every tracked cron entry.
SELECT name, expression AS signature, last_tick, updated_at FROM koban_cron ORDER BY name;

-- name: control_queue
-- Set a queue's cluster-wide settings; only the flagged ones change.
INSERT INTO koban_queues AS q (name, paused, "limit", updated_at)
VALUES (%(queue)s, coalesce(%(paused)s, false), %(limit)s, coalesce(%(now)s::timestamptz, now()))
ON CONFLICT (name) DO UPDATE SET
    paused = CASE WHEN %(set_paused)s THEN excluded.paused ELSE q.paused END,
    "limit" = CASE WHEN %(set_limit)s THEN excluded."limit" ELSE q."limit" END,
    updated_at = excluded.updated_at;

-- name: clear_node_control
-- Drop the per-node settings of one queue's key on every node (a cluster-wide change wins).
UPDATE koban_nodes SET meta = meta #- ARRAY['control', %(queue)s::text, %(key)s::text]
WHERE meta -> 'control' -> %(queue)s::text ? %(key)s::text;

-- name: control_node_queue
-- Set or remove per-node settings of one queue in the node's row.
UPDATE koban_nodes
SET meta = jsonb_set(meta, '{control}', coalesce(meta -> 'control', '{}'::jsonb)
    || jsonb_build_object(%(queue)s::text,
           (coalesce(meta -> 'control' -> %(queue)s::text, '{}'::jsonb) || %(set)s::jsonb)
           - %(unset)s::text[]))
WHERE name = %(node)s
RETURNING name;

-- name: queue_settings
-- Cluster-wide queue settings.
SELECT name, paused, "limit" FROM koban_queues ORDER BY name;

-- name: replace_job
-- On a unique conflict, update the chosen fields of the existing job while it has not started
-- (available, scheduled, retryable); a new scheduled_at also moves it between available and
-- scheduled, and a job made available wakes its queue.
WITH t AS (
    SELECT coalesce(%(now)s::timestamptz, now()) AS t
), new AS (
    SELECT t.t, coalesce(%(scheduled_at)s::timestamptz,
                         t.t + make_interval(secs => coalesce(%(schedule_in)s, 0))) AS run_at
    FROM t
), updated AS (
    UPDATE koban_jobs AS j SET
        args = CASE WHEN 'args' = ANY(%(fields)s::text[]) THEN %(args)s::jsonb ELSE j.args END,
        meta = CASE WHEN 'meta' = ANY(%(fields)s::text[]) THEN %(meta)s::jsonb ELSE j.meta END,
        tags = CASE WHEN 'tags' = ANY(%(fields)s::text[]) THEN %(tags)s::text[] ELSE j.tags END,
        priority = CASE WHEN 'priority' = ANY(%(fields)s::text[]) THEN %(priority)s::smallint
                        ELSE j.priority END,
        max_attempts = CASE WHEN 'max_attempts' = ANY(%(fields)s::text[])
                            THEN %(max_attempts)s::integer ELSE j.max_attempts END,
        queue = CASE WHEN 'queue' = ANY(%(fields)s::text[]) THEN %(queue)s::text ELSE j.queue END,
        scheduled_at = CASE WHEN 'scheduled_at' = ANY(%(fields)s::text[]) THEN new.run_at
                            ELSE j.scheduled_at END,
        state = CASE WHEN 'scheduled_at' = ANY(%(fields)s::text[])
                          AND j.state IN ('available', 'scheduled')
                     THEN CASE WHEN new.run_at > new.t THEN 'scheduled' ELSE 'available' END
                     ELSE j.state END
    FROM new
    WHERE j.id = %(id)s AND j.state IN ('available', 'scheduled', 'retryable')
    RETURNING j.*
), woken AS (
    SELECT count(pg_notify('koban_insert', json_build_object('queue', queue)::text)) AS n
    FROM updated WHERE state = 'available'
)
SELECT updated.* FROM updated, woken;
