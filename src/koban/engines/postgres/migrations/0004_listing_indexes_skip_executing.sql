-- koban schema, version 4: the listing indexes leave out executing jobs.
-- A job writes three row versions on its way through (inserted, claimed, finished), and every
-- version takes an entry in every index whose predicate it matches. The claimed version is the
-- one no list needs from these indexes: executing jobs are few (at most the cluster's slots)
-- and koban_jobs_executing_idx holds them all. The three listing indexes were about a third of
-- PostgreSQL's work per job on a burn-down; leaving the claimed version out saves a third of
-- that. Lists, counts and bulk actions name their states as literals so the planner can match
-- these predicates, and find executing jobs through koban_jobs_executing_idx (engine.py,
-- `_branches`). Each of the three indexes is built by a scan of the whole table, and DROP INDEX
-- locks the table until the migration commits: on a large table, stop the nodes or expect
-- fetches to wait for the rebuild. Until every node runs this version, older nodes' lists and
-- bulk actions cannot use these indexes.
DROP INDEX IF EXISTS koban_jobs_state_idx;
DROP INDEX IF EXISTS koban_jobs_queue_idx;
DROP INDEX IF EXISTS koban_jobs_worker_idx;
CREATE INDEX koban_jobs_state_idx ON koban_jobs (state, id) WHERE state <> 'executing';
CREATE INDEX koban_jobs_queue_idx ON koban_jobs (queue, id) WHERE state <> 'executing';
CREATE INDEX koban_jobs_worker_idx ON koban_jobs (worker, id) WHERE state <> 'executing';
