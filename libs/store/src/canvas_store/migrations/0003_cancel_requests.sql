-- Cancels requested and not applied yet: a cancel answered 202 must win over whatever
-- the orchestrator records next for the job, however late the JobCancelRequested
-- message reaches it (another replica took it, it waits behind a backlog, a frozen
-- consumer held it). The gateway writes the request before it answers 202, under a
-- share lock on the job's row (or, for a job not recorded yet, under the job's
-- recording lock); the orchestrator reads the requests of a job after locking it, before
-- it records a start, a result or the job itself, and applies them first. A cancel
-- message for a job not recorded yet is kept here too. A request goes once its job is
-- recorded cancelled. The envelope is the JobCancelRequested as the gateway sent it.
CREATE TABLE cancel_requests (
    job_id       uuid        PRIMARY KEY,
    envelope     jsonb       NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now()
);
