"""canvas_generator: the ai-generator service of canvas-jobs.

It takes GenerationRequested attempts from the work queue, asks an OpenAI-compatible
model for a drawing, and publishes GenerationStarted and then GenerationSucceeded or
GenerationFailed. It has no database. :mod:`canvas_generator.fake_openai` is the
offline stand-in model server the tests and ``make dev`` use.
"""
