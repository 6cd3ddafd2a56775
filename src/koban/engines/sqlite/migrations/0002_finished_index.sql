-- koban schema for SQLite, version 2: an index for the pruner.
-- The pruner deletes finished jobs by the time they finished, oldest first, in small batches;
-- with this index a batch reads only the rows it deletes. The expression is the one the
-- pruner's statement uses, so the planner matches them.
CREATE INDEX koban_jobs_finished_idx ON koban_jobs (state, (CASE state
        WHEN 'completed' THEN completed_at
        WHEN 'cancelled' THEN cancelled_at
        ELSE discarded_at END))
    WHERE state IN ('completed', 'cancelled', 'discarded');
