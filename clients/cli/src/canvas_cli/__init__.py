"""canvas-jobs command line client (``canvas-jobs``): mint development tokens, submit
prompts, watch jobs live, read their status and events, cancel them.

Modules: ``app`` (the typer commands), ``api`` (the gateway's REST API), ``watch``
(follow a job: recorded events, then the notifier's WebSocket), ``view`` (a job folded
from frames; pure), ``render`` (rich tables and the live panel; pure), ``config``
(URLs and token), ``errors`` (the exception tree and exit codes).
"""
