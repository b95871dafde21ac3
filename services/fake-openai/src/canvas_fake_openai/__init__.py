"""canvas_fake_openai: the offline, OpenAI-compatible stand-in model of canvas-jobs.

Tests, benchmarks and ``make dev`` without an ``OPENAI_API_KEY`` point the ai-generator
at it instead of OpenAI. :mod:`canvas_fake_openai.server` holds the server, its knobs
and its ``[[fake:...]]`` directives; ``canvas-fake-openai`` runs it.
"""
