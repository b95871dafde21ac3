"""canvas_events: what the canvas-jobs services share.

Imported by every service, never run on its own:

- :mod:`canvas_events.envelope` and :mod:`canvas_events.events`: the message envelope
  and the domain events (frozen pydantic models with a schema version).
- :mod:`canvas_events.objects`: the canvas objects a model may draw (docs/api.md,
  "Canvas route").
- :mod:`canvas_events.topology`: exchanges, queues, dead-letter queues, routing keys.
- :mod:`canvas_events.broker`: a reconnecting broker connection, a confirming
  publisher and a consumer with named outcomes (what a delivery's outcome does to the
  message is decided in one place, :class:`~canvas_events.broker.Deliveries`).
- :mod:`canvas_events.testing`: an in-memory broker for unit tests of consumer code:
  the same handlers, the same outcomes, no RabbitMQ.
- :mod:`canvas_events.logging`, :mod:`canvas_events.settings`, :mod:`canvas_events.auth`,
  :mod:`canvas_events.postgres`, :mod:`canvas_events.ops`: logging, configuration,
  tokens, database pools and the health/readiness/metrics plumbing.
"""
