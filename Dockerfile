# Every canvas-jobs image, from the repository root. SERVICE names the folder under
# services/ (and the stage below that runs its console script):
#   docker build --build-arg SERVICE=gateway -t canvas-jobs/gateway .
#   SERVICE: gateway, job-orchestrator, ai-generator, notifier, fake-openai (the stand-in model)
# SERVICE has no default: without it, or with a name no stage below has, the build fails.
ARG SERVICE

# --- builder: resolves and installs into /opt/venv; none of its tools reach the final image.
FROM python:3.11-slim AS builder
ARG SERVICE

# Same uv as the Makefile, so the image resolves exactly as `make install` does.
ARG UV_VERSION=0.13.9
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
RUN pip install "uv==${UV_VERSION}"

WORKDIR /src
COPY requirements.lock ./
COPY libs libs
COPY services/${SERVICE} services/${SERVICE}
# The lock installs the members editable (-e lines); the image wants them as plain
# packages, with every third-party version still pinned by the rest of the lock.
RUN --mount=type=cache,target=/root/.cache/uv \
    grep -v '^-e' requirements.lock > constraints.txt \
    && uv venv /opt/venv \
    && uv pip install --python /opt/venv/bin/python -c constraints.txt \
        ./libs/events ./libs/store ./services/${SERVICE}

# --- runtime: the interpreter, the virtual environment, an unprivileged user.
FROM python:3.11-slim AS runtime

# A fixed numeric id, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 canvas \
    && useradd --system --uid 10001 --gid canvas --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin canvas

COPY --from=builder /opt/venv /opt/venv
# Bytecode was compiled in the builder; the non-root user could not write it anyway.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001

# --- one stage per image: what sets each apart (its port, health check and console
# script). The health check asks /health, not /ready: a container waiting for its
# database is alive and must not be restarted for it; compose's healthcheck on /ready
# gates the services that depend on it.
FROM runtime AS image-gateway
LABEL org.opencontainers.image.title="canvas-jobs gateway" \
      org.opencontainers.image.description="The public REST API."
ENV GATEWAY_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_PORT', '8000') + '/health', timeout=4)"]
CMD ["canvas-gateway"]

FROM runtime AS image-job-orchestrator
LABEL org.opencontainers.image.title="canvas-jobs job-orchestrator" \
      org.opencontainers.image.description="The job state machine, event store and read models in PostgreSQL."
ENV ORCHESTRATOR_PORT=8002
EXPOSE 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ORCHESTRATOR_PORT', '8002') + '/health', timeout=4)"]
CMD ["canvas-orchestrator"]

FROM runtime AS image-ai-generator
LABEL org.opencontainers.image.title="canvas-jobs ai-generator" \
      org.opencontainers.image.description="Calls the OpenAI-compatible model."
ENV GENERATOR_PORT=8003
EXPOSE 8003
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GENERATOR_PORT', '8003') + '/health', timeout=4)"]
CMD ["canvas-generator"]

FROM runtime AS image-notifier
LABEL org.opencontainers.image.title="canvas-jobs notifier" \
      org.opencontainers.image.description="Pushes job status events to WebSocket clients."
ENV NOTIFIER_PORT=8001
EXPOSE 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('NOTIFIER_PORT', '8001') + '/health', timeout=4)"]
CMD ["canvas-notifier"]

# The offline stand-in model: listens on every interface, as the services do (its own
# default, 127.0.0.1, would be unreachable from the other containers).
FROM runtime AS image-fake-openai
LABEL org.opencontainers.image.title="canvas-jobs fake-openai" \
      org.opencontainers.image.description="The offline, OpenAI-compatible stand-in model (canvas-fake-openai), for tests and development."
ENV FAKE_OPENAI_HOST=0.0.0.0 \
    FAKE_OPENAI_PORT=8090
EXPOSE 8090
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('FAKE_OPENAI_PORT', '8090') + '/health', timeout=4)"]
CMD ["canvas-fake-openai"]

# --- the image: the stage of SERVICE.
FROM image-${SERVICE}
