-- The event store and the read models projected from it.
-- Applied by the orchestrator at start, once, under an advisory lock (see migrations.py).

-- Every job is a stream of events. (stream_id, version) is the primary key, so two
-- writers that both read version N cannot both append N+1: the database enforces
-- optimistic concurrency. `position` orders all events globally; it is taken while the
-- appending transaction holds an advisory lock until commit, so positions become
-- visible in order and a reader that has seen N never later finds a smaller one.
CREATE TABLE events (
    stream_id      uuid        NOT NULL,
    version        integer     NOT NULL CHECK (version >= 1),
    position       bigint      NOT NULL GENERATED ALWAYS AS IDENTITY,
    event_id       uuid        NOT NULL,
    type           text        NOT NULL,
    schema_version integer     NOT NULL,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    correlation_id text        NOT NULL,
    causation_id   uuid,
    user_id        text        NOT NULL,
    canvas_id      text,
    data           jsonb       NOT NULL,
    PRIMARY KEY (stream_id, version),
    UNIQUE (position),
    UNIQUE (event_id)
);
-- The notifier replays one user's events after a position.
CREATE INDEX events_user_position ON events (user_id, position);

-- Consumed message ids, written in the same transaction as their effect: a redelivered
-- or duplicated message finds its row and changes nothing.
CREATE TABLE processed_messages (
    consumer     text        NOT NULL,
    message_id   uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- How far the relay has published the events table to RabbitMQ.
CREATE TABLE relay_checkpoints (
    name     text   PRIMARY KEY,
    position bigint NOT NULL
);

-- Read model: one row a job, the fold of its stream (rebuildable from events).
CREATE TABLE jobs (
    id                uuid        PRIMARY KEY,
    user_id           text        NOT NULL,
    canvas_id         text        NOT NULL,
    query             text        NOT NULL,
    priority          smallint    NOT NULL,
    options           jsonb       NOT NULL DEFAULT '{}',
    idempotency_key   text,
    status            text        NOT NULL,
    created_at        timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL,
    started_at        timestamptz,
    completed_at      timestamptz,
    error_message     text,
    retry_count       integer     NOT NULL DEFAULT 0,
    next_attempt_at   timestamptz,
    attempt           integer     NOT NULL DEFAULT 0,
    attempt_id        uuid,
    lease_expires_at  timestamptz,
    result            jsonb,
    version           integer     NOT NULL,
    last_position     bigint      NOT NULL
);
CREATE INDEX jobs_user_created ON jobs (user_id, created_at DESC, id DESC);
CREATE INDEX jobs_status ON jobs (status);

-- Read model: which user a canvas belongs to (the first to draw on it).
CREATE TABLE canvases (
    id         text        PRIMARY KEY,
    user_id    text        NOT NULL,
    created_at timestamptz NOT NULL
);

-- Read model: the objects completed jobs put on canvases, written once at completion.
CREATE TABLE canvas_objects (
    id         text        PRIMARY KEY,
    canvas_id  text        NOT NULL,
    job_id     uuid        NOT NULL,
    user_id    text        NOT NULL,
    index      integer     NOT NULL,
    object     jsonb       NOT NULL,
    created_at timestamptz NOT NULL,
    UNIQUE (job_id, index)
);
CREATE INDEX canvas_objects_canvas ON canvas_objects (canvas_id, created_at, job_id, index);
