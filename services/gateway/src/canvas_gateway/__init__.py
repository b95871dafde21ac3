"""canvas_gateway: the public REST API of canvas-jobs (docs/api.md).

It checks a request, records it in its ledger, publishes JobRequested and answers 202
once the broker confirmed it; it answers reads from the orchestrator's read models.
Layout: ``settings.py``, ``service.py`` (the process's parts, serve), ``api.py`` (the HTTP
app: create_app), ``deps.py``,
``schemas.py``, ``store.py`` (every SQL statement, and the gateway's only state),
``middleware.py`` (request ids, access log, HTTP metrics), ``routes/``.
"""
