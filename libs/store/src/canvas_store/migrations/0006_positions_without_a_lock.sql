-- Global positions without the append lock (canvas_store.events says why and how).
--
-- Until now every append took one advisory lock until it committed, so positions became
-- visible in order; the whole cluster's appends took turns on it. From here a position
-- is the appending transaction's id times 4096 plus the event's number within that
-- transaction: appends run side by side, and a reader that reads only below the oldest
-- transaction still in flight (canvas_settled_positions_below) reads a prefix that no
-- later commit can add to. Positions stay unique and increasing in the order readers
-- read them; they are no longer dense (they never were: rollbacks left holes).

-- The position of the next event the current transaction appends. The counter lives in
-- a transaction-local setting, so it starts again at 0 in every transaction (and goes
-- back with a rolled-back savepoint, as the rows it numbered do).
CREATE FUNCTION canvas_next_event_position() RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    number integer := coalesce(
        nullif(current_setting('canvas.event_number', true), ''), '-1'
    )::integer + 1;
BEGIN
    IF number >= 4096 THEN
        RAISE EXCEPTION 'one transaction may append at most 4096 events'
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    PERFORM set_config('canvas.event_number', number::text, true);
    RETURN (pg_current_xact_id()::text::bigint << 12) + number;
END
$$;

-- Every position below this one is settled: the transactions that could still append
-- one are all finished (committed or rolled back), as of the calling statement.
CREATE FUNCTION canvas_settled_positions_below() RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint << 12
$$;

-- The positions given so far (identity values) are all below the first new one: a
-- transaction id is at least the number of transactions before it, and no transaction
-- appended 4096 events.
DO $$
BEGIN
    IF (SELECT coalesce(max(position), 0) FROM events)
            >= (pg_current_xact_id()::text::bigint << 12) THEN
        RAISE EXCEPTION 'events.position already reaches the new positions';
    END IF;
END
$$;

ALTER TABLE events ALTER COLUMN position DROP IDENTITY;
ALTER TABLE events ALTER COLUMN position SET DEFAULT canvas_next_event_position();
