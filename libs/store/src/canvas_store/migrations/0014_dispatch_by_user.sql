-- Fair dispatch reads, for each user with waiting jobs, only as many of them as a round
-- may hand out (canvas_orchestrator.dispatch): the users one index probe each, then each
-- user's first waiting jobs in fair order. Before, every round read every waiting job
-- (about 200 ms a round at 100,000 waiting). A partial index: only waiting jobs.
CREATE INDEX jobs_awaiting_dispatch_by_user
    ON jobs (user_id, priority DESC, created_at, id)
    WHERE awaiting_dispatch;
