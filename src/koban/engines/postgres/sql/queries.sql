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
    SELECT count(pg_notify('koban_insert', json_build_object('queue', queue)::text)) AS n
    FROM (SELECT DISTINCT queue FROM inserted WHERE state = 'available') AS q
)
SELECT inserted.* FROM inserted, woken ORDER BY id;

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
RETURNING j.*;

-- name: complete_jobs
-- Mark jobs completed, only where they are still executing the attempt that finished.
UPDATE koban_jobs AS j
SET state = 'completed', completed_at = coalesce(%(now)s::timestamptz, now())
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS x(id, attempt)
WHERE j.id = x.id AND j.state = 'executing' AND j.attempt = x.attempt;

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
WHERE j.id = x.id AND j.state = 'executing' AND j.attempt = x.attempt;

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
    WHERE j.state = 'completed' AND j.completed_at >= bounds.since
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
