"""canvas_generator: the ai-generator service of canvas-jobs.

It takes GenerationRequested attempts from the work queue, asks an OpenAI-compatible
model for a drawing, and publishes GenerationStarted and then GenerationSucceeded or
GenerationFailed. It has no database. The offline stand-in model the tests and
``make dev`` use is the package ``canvas_fake_openai`` (services/fake-openai).
"""
