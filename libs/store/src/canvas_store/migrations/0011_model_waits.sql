-- Attempts waiting for the fleet's model budget, so that a queued job's status can say
-- why it waits (canvas_store.budget writes a row each time a permit is refused, and
-- removes it when one is granted).
CREATE TABLE model_waits (
    attempt_id uuid        PRIMARY KEY,
    model      text        NOT NULL,
    reason     text        NOT NULL,
    asked_at   timestamptz NOT NULL
);
