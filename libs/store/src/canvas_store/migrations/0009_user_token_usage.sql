-- The per-user daily token budget (USER_DAILY_TOKEN_BUDGET) sums the tokens of a
-- user's jobs completed since the start of the UTC day (canvas_store.usage): only those
-- rows, however many jobs the user completed on earlier days. The status is written out:
-- the planner matches it to the query's. A plain CREATE INDEX (the migration runs in a
-- transaction, so not CONCURRENTLY): it blocks writes to jobs while it builds, a few
-- seconds for millions of jobs.
CREATE INDEX jobs_user_completed ON jobs (user_id, completed_at)
    WHERE status = 'completed';
