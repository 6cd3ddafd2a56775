-- koban schema, version 5: a column's check runs when the column is written, not on every update.
-- PostgreSQL evaluates every CHECK constraint of a table on every new row version, whichever
-- columns the UPDATE sets. A job's claim and its outcome set only the state, the attempt and a
-- few times, yet each re-checked queue, worker, args, meta, priority and max_attempts. That was
-- ~2% of PostgreSQL's CPU per claimed-and-completed no-op job, and ~25% with 6 KB of args,
-- which each check read back from TOAST. A domain's check runs only where a value is written
-- into a column of that type (an insert, a COPY, an UPDATE that sets the column), so the same
-- rules hold for every row while a claim checks only what it writes.
-- The state keeps its table check: every statement that writes a row version sets it anyway.
-- Changing a column's type rewrites the table and rebuilds its indexes under the migration's
-- lock: on a large table, stop the nodes or expect fetches to wait until it commits.
CREATE DOMAIN koban_queue_name AS text CHECK (length(VALUE) BETWEEN 1 AND 128);
CREATE DOMAIN koban_worker_name AS text CHECK (length(VALUE) BETWEEN 1 AND 255);
CREATE DOMAIN koban_json_object AS jsonb CHECK (jsonb_typeof(VALUE) = 'object');
CREATE DOMAIN koban_priority AS smallint CHECK (VALUE BETWEEN 0 AND 9);
CREATE DOMAIN koban_attempt AS integer CHECK (VALUE >= 0);
CREATE DOMAIN koban_max_attempts AS integer CHECK (VALUE > 0);

ALTER TABLE koban_jobs
    DROP CONSTRAINT koban_jobs_queue_check,
    DROP CONSTRAINT koban_jobs_worker_check,
    DROP CONSTRAINT koban_jobs_args_check,
    DROP CONSTRAINT koban_jobs_meta_check,
    DROP CONSTRAINT koban_jobs_priority_check,
    DROP CONSTRAINT koban_jobs_attempt_check,
    DROP CONSTRAINT koban_jobs_max_attempts_check,
    ALTER COLUMN queue TYPE koban_queue_name,
    ALTER COLUMN worker TYPE koban_worker_name,
    ALTER COLUMN args TYPE koban_json_object,
    ALTER COLUMN meta TYPE koban_json_object,
    ALTER COLUMN priority TYPE koban_priority,
    ALTER COLUMN attempt TYPE koban_attempt,
    ALTER COLUMN max_attempts TYPE koban_max_attempts;
