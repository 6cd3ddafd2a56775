-- koban schema for SQLite, version 1: jobs, nodes, leadership, queues, cron, notifications.
-- The same tables as the PostgreSQL schema, in SQLite's types:
--   * times are INTEGER microseconds since the Unix epoch, UTC (ordering and comparison are
--     plain integer ones; koban.engines.sqlite.rows converts them);
--   * JSON (args, meta, errors, tags, attempted_by, queues) is TEXT checked with json_type;
--   * booleans are INTEGER 0/1.
-- The whole file runs in one transaction.

CREATE TABLE koban_jobs (
    -- AUTOINCREMENT: an id is never reused, even after the newest job is deleted.
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    state         TEXT    NOT NULL DEFAULT 'available' CHECK (state IN (
                      'available', 'scheduled', 'executing', 'retryable',
                      'completed', 'discarded', 'cancelled')),
    queue         TEXT    NOT NULL DEFAULT 'default' CHECK (length(queue) BETWEEN 1 AND 128),
    worker        TEXT    NOT NULL CHECK (length(worker) BETWEEN 1 AND 255),
    args          TEXT    NOT NULL DEFAULT '{}' CHECK (json_type(args) = 'object'),
    meta          TEXT    NOT NULL DEFAULT '{}' CHECK (json_type(meta) = 'object'),
    tags          TEXT    NOT NULL DEFAULT '[]' CHECK (json_type(tags) = 'array'),
    errors        TEXT    NOT NULL DEFAULT '[]' CHECK (json_type(errors) = 'array'),
    priority      INTEGER NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    attempt       INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts  INTEGER NOT NULL DEFAULT 20 CHECK (max_attempts > 0),
    -- ["node", "producer"] while and after an attempt.
    attempted_by  TEXT    CHECK (attempted_by IS NULL OR json_type(attempted_by) = 'array'),
    inserted_at   INTEGER NOT NULL
                  DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
    scheduled_at  INTEGER NOT NULL
                  DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
    attempted_at  INTEGER,
    completed_at  INTEGER,
    cancelled_at  INTEGER,
    discarded_at  INTEGER,
    -- Unique jobs: the key, and a bit per state (see koban.unique.STATE_BITS) in which the
    -- key blocks another insert.
    unique_key    TEXT,
    unique_states INTEGER
);

-- Fetch: the next available jobs of one queue, in priority, scheduled_at, id order.
CREATE INDEX koban_jobs_fetch_idx ON koban_jobs (queue, priority, scheduled_at, id)
    WHERE state = 'available';
-- Stager: due scheduled and retryable jobs.
CREATE INDEX koban_jobs_stage_idx ON koban_jobs (scheduled_at, id)
    WHERE state IN ('scheduled', 'retryable');
-- Rescue: executing jobs, by the node running them.
CREATE INDEX koban_jobs_executing_idx ON koban_jobs (json_extract(attempted_by, '$[0]'), id)
    WHERE state = 'executing';
-- Lists and the pruner: newest first within a state, a queue or a worker.
CREATE INDEX koban_jobs_state_idx ON koban_jobs (state, id);
CREATE INDEX koban_jobs_queue_idx ON koban_jobs (queue, id);
CREATE INDEX koban_jobs_worker_idx ON koban_jobs (worker, id);
-- Unique jobs: one row per key among rows whose state has its bit set in unique_states.
CREATE UNIQUE INDEX koban_jobs_unique_idx ON koban_jobs (unique_key)
    WHERE unique_key IS NOT NULL AND (unique_states & CASE state
        WHEN 'available' THEN 1 WHEN 'scheduled' THEN 2 WHEN 'executing' THEN 4
        WHEN 'retryable' THEN 8 WHEN 'completed' THEN 16 WHEN 'discarded' THEN 32
        WHEN 'cancelled' THEN 64 ELSE 0 END) <> 0;

-- Every running node, with its last heartbeat.
CREATE TABLE koban_nodes (
    name          TEXT    PRIMARY KEY,
    started_at    INTEGER NOT NULL
                  DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
    heartbeat_at  INTEGER NOT NULL
                  DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
    queues        TEXT    NOT NULL DEFAULT '{}' CHECK (json_type(queues) = 'object'),
    meta          TEXT    NOT NULL DEFAULT '{}' CHECK (json_type(meta) = 'object')
);

-- The cluster's leader: at most one row, held until expires_at.
CREATE TABLE koban_leader (
    name          TEXT    PRIMARY KEY DEFAULT 'koban' CHECK (name = 'koban'),
    node          TEXT    NOT NULL,
    elected_at    INTEGER NOT NULL
                  DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)),
    expires_at    INTEGER NOT NULL
);

-- Runtime queue settings shared by every node (pause, scale).
CREATE TABLE koban_queues (
    name          TEXT    PRIMARY KEY,
    paused        INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    "limit"       INTEGER CHECK ("limit" IS NULL OR "limit" >= 0),
    updated_at    INTEGER NOT NULL
                  DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
);

-- The last tick inserted for each cron entry, for exactly-once ticks and catch-up.
CREATE TABLE koban_cron (
    name          TEXT    PRIMARY KEY,
    expression    TEXT    NOT NULL,
    last_tick     INTEGER,
    updated_at    INTEGER NOT NULL
                  DEFAULT (CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER))
);

-- Notifications for nodes in other processes, which poll for ids above the last one they saw
-- (SQLite has no LISTEN/NOTIFY). AUTOINCREMENT keeps ids rising after old rows are pruned.
-- `origin` names the process that already delivered the row to its own listeners in memory;
-- NULL means every listener must deliver it.
CREATE TABLE koban_notifications (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    channel       TEXT    NOT NULL,
    payload       TEXT    NOT NULL DEFAULT '{}',
    origin        TEXT,
    created_at    INTEGER NOT NULL
);
CREATE INDEX koban_notifications_created_idx ON koban_notifications (created_at);
