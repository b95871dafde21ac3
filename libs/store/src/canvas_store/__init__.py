"""canvas_store: the one owner of canvas-jobs' PostgreSQL schema.

Every table, and every statement a service other than the job-orchestrator runs against
one, is here; the import arrows show who reads and writes what:

- ``migrations.py`` and ``migrations/*.sql``: the schema, applied in order, once each,
  by the job-orchestrator at start (the gateway's ledger included);
- ``connections.py``: JSON columns as Python values and the services' session settings,
  one way for every pool and connection;
- ``status.py``: :class:`JobStatus`, the one list of a job's statuses;
- ``errors.py``: what the store raises (a database outage is not one of them:
  ``canvas_events.postgres.is_outage`` tells those);
- ``events.py``: the event store (appends with ordered positions, stream reads, the
  relay's and the notifier's reads after a position) and the one row-to-envelope
  mapping;
- ``jobs.py``: reads of the read models (a job, an attempt, a canvas's owner, counts,
  how long work waits);
- ``views.py``: what a user sees of their jobs, the ledger's accepted requests included;
- ``ledger.py``: the gateway's ledger of accepted requests;
- ``usage.py``: the tokens a user's jobs used in a UTC day (the daily token budget);
- ``cancels.py``: the cancels users requested, written by the gateway, applied by the
  orchestrator.

The job-orchestrator keeps the statements of its own write path (the committer's
transaction, projections, timers, relay, retention) beside the code that decides them.
"""
