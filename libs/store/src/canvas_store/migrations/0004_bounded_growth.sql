-- What a year of traffic must not slow down.

-- processed_messages is pruned by age (retention.py): a BRIN index over the insertion
-- order finds the old rows for a fraction of a B-tree's upkeep.
CREATE INDEX processed_messages_processed_at ON processed_messages USING brin (processed_at);

-- The per-user limit counts a user's unfinished jobs: only those, however many have
-- ended (the statuses are written out: the planner matches them to the query's).
CREATE INDEX jobs_user_active ON jobs (user_id)
    WHERE status IN ('queued', 'processing', 'retry_scheduled');
