"""canvas_notifier: pushes job status events to WebSocket clients (docs/api.md).

- :mod:`canvas_notifier.frames`: the protocol, pure: events to frames, client messages,
  subscriptions.
- :mod:`canvas_notifier.hub`: connections by user, bounded outboxes, close codes.
- :mod:`canvas_notifier.service`: the asyncio shell: websockets server, broker consumer,
  replays from the event store (:mod:`canvas_notifier.store`).
"""
