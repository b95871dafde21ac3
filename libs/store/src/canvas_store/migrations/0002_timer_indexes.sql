-- The timers poll these every half second: keep each poll an index range scan over the
-- few jobs that wait, however many jobs have ended.
CREATE INDEX jobs_retry_due ON jobs (next_attempt_at) WHERE status = 'retry_scheduled';
CREATE INDEX jobs_lease ON jobs (lease_expires_at) WHERE status IN ('queued', 'processing');
