-- A job run again (POST .../retry) names the job it repeats, in its JobRequested and so
-- in both places its status is answered from: the ledger while it is not recorded, the
-- jobs read model after.
ALTER TABLE gateway_job_requests ADD COLUMN IF NOT EXISTS retry_of uuid;
ALTER TABLE jobs ADD COLUMN retry_of uuid;

-- The operators' list (GET /api/admin/jobs): every user's jobs, newest first, read a
-- page at a time along this index, with the filters applied as it goes.
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);
