-- Fair dispatch (docs/events.md, "Fair dispatch"): a queued job whose attempt is not
-- handed to the generators yet awaits dispatch (set by JobQueued, cleared by
-- GenerationRequested and by every later status). The orchestrator's dispatcher hands
-- them out as the fleet's capacity frees, round robin across users.
ALTER TABLE jobs ADD COLUMN awaiting_dispatch boolean NOT NULL DEFAULT false;
CREATE INDEX jobs_awaiting_dispatch ON jobs (priority DESC, created_at, id)
    WHERE awaiting_dispatch;

-- What each generator process announced of itself (POST /internal/generators/heartbeat):
-- the fleet's capacity is the sum over those seen lately.
CREATE TABLE generators (
    generator_id text        PRIMARY KEY,
    capacity     integer     NOT NULL,
    running      integer     NOT NULL,
    seen_at      timestamptz NOT NULL
);
