-- The fleet's model budget (MODEL_REQUESTS_PER_MINUTE, MODEL_TOKENS_PER_MINUTE): each
-- model call a generator is allowed to make, and the pauses a 429 asked for. The
-- orchestrator grants permits (canvas_store.budget) one model at a time, under an
-- advisory lock, so that every replica of every service counts the same calls.
CREATE TABLE model_permits (
    model       text        NOT NULL,
    attempt_id  uuid        NOT NULL,
    run_id      uuid        NOT NULL,
    granted_at  timestamptz NOT NULL,
    -- An estimate when granted; the call's real usage once its generator reports it.
    tokens      integer     NOT NULL,
    PRIMARY KEY (attempt_id, run_id)
);
CREATE INDEX model_permits_window ON model_permits (model, granted_at);

CREATE TABLE model_pauses (
    model        text        PRIMARY KEY,
    paused_until timestamptz NOT NULL
);
