-- The gateway's ledger of the job requests it accepted (canvas_store.ledger says what
-- each column is for). Gateways created it themselves before it came here, hence
-- IF NOT EXISTS throughout: a database they set up is migrated as it stands.
CREATE TABLE IF NOT EXISTS gateway_job_requests (
    job_id          uuid        PRIMARY KEY,
    user_id         text        NOT NULL,
    canvas_id       text        NOT NULL,
    priority        smallint    NOT NULL,
    query           text        NOT NULL,
    options         jsonb       NOT NULL DEFAULT '{}',
    idempotency_key text,
    correlation_id  text        NOT NULL,
    created_at      timestamptz NOT NULL,
    confirmed_at    timestamptz,
    UNIQUE (user_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS gateway_job_requests_user
    ON gateway_job_requests (user_id, created_at DESC, job_id DESC);
CREATE INDEX IF NOT EXISTS gateway_job_requests_canvas
    ON gateway_job_requests (canvas_id);
ALTER TABLE gateway_job_requests
    ADD COLUMN IF NOT EXISTS recorded_at   timestamptz,
    ADD COLUMN IF NOT EXISTS resends       integer     NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS last_sent_at  timestamptz,
    ADD COLUMN IF NOT EXISTS given_up_at   timestamptz,
    ADD COLUMN IF NOT EXISTS error_message text;
-- The sweep's rows, and the limit's: accepted, not known recorded yet, not given up.
CREATE INDEX IF NOT EXISTS gateway_job_requests_unrecorded
    ON gateway_job_requests (confirmed_at) WHERE recorded_at IS NULL AND given_up_at IS NULL;
CREATE INDEX IF NOT EXISTS gateway_job_requests_user_unrecorded
    ON gateway_job_requests (user_id) WHERE recorded_at IS NULL AND given_up_at IS NULL;
