-- koban schema, version 3: index only the jobs that have tags.
-- Every claim and every outcome writes a new version of the job's row, and a GIN index takes an
-- entry for each version even when the array is empty: on a burn-down of untagged jobs the
-- tags index was about a sixth of PostgreSQL's work. Only tagged jobs are indexed now; tag
-- filters add `tags <> '{}'` so the planner matches this index's predicate. Building it reads
-- the whole table once, under the migration's lock.
DROP INDEX IF EXISTS koban_jobs_tags_idx;
CREATE INDEX koban_jobs_tags_idx ON koban_jobs USING gin (tags) WHERE tags <> '{}';
