-- Readers stop below the oldest transaction still in flight (0006,
-- canvas_settled_positions_below). The snapshot's in-flight transactions are the whole
-- cluster's: a write transaction left open in another database (a migration, a batch
-- job, a session idle in a transaction) held every reader of this one back until it
-- ended, though it cannot append here (a transaction belongs to one database).
--
-- This bound leaves out the in-flight transactions that pg_stat_activity shows in
-- another database; any other one (this database's, one whose backend is gone or not
-- shown to this role, a prepared one) still holds readers back. A backend never changes
-- database and a transaction id is never another's, so a stale view of pg_stat_activity
-- can only keep one more, never drop one of ours. Reading pg_stat_activity costs about
-- a millisecond: the relay reads with this bound only once it found another database's
-- transaction the oldest in flight (canvas_store.events); users' replays read up to the
-- floor those reads raise (settled_floor, below).
CREATE FUNCTION canvas_settled_positions_below_here() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (
            SELECT min(x) FROM pg_snapshot_xip(s) AS x
            WHERE NOT EXISTS (
                SELECT 1 FROM pg_stat_activity AS a
                WHERE a.backend_xid = x::xid
                  AND a.datid <> (SELECT oid FROM pg_database WHERE datname = current_database())
            )
        ),
        pg_snapshot_xmax(s)
    )::text::bigint << 12
    FROM pg_current_snapshot() AS s
$$;

-- The highest bound read with canvas_settled_positions_below_here() so far (the relay's
-- reads past another database's transaction raise it in the same statement). That
-- bound does not only grow: a transaction of another database that ends while a read
-- runs is no longer shown, so it is kept as unknown. Every position below this floor
-- is settled for good, so a user's replay reads up to it at least: never short of
-- what the relay already published.
CREATE TABLE settled_floor (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    below     bigint  NOT NULL
);
INSERT INTO settled_floor (below) VALUES (0);
