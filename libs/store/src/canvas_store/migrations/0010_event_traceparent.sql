-- The trace an event belongs to (docs/operations.md, "Traces"): the W3C traceparent of
-- the span that recorded it (the consumed message's), NULL while traces are off. The
-- relay publishes the event as that span's child, so that the messages the outbox sends
-- continue the trace of the message that caused them; a timer's events take the one of
-- their job's last event. Not part of the envelope: the envelope's JSON is the contract.
-- Nullable without a default: adding it rewrites no row.
ALTER TABLE events ADD COLUMN traceparent text;
