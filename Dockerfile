# The phone agent: the carriers' webhooks, media streams, probes and metrics, in one process
# or (WORKERS) one worker process per core.
# Build from the repository root: docker build -t phone-agent .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOG_FORMAT=json \
    PROMPTS_DIR=/srv/prompts \
    VAD_MODEL_PATH=/srv/silero_vad.onnx \
    ARCHIVE_DIR=/data/calls

# An unprivileged user (10001, as deploy/kubernetes.yaml runs it); the archive is the only
# place it writes.
RUN groupadd --system --gid 10001 agent \
    && useradd --system --uid 10001 --gid agent --home-dir /srv --shell /usr/sbin/nologin agent \
    && mkdir -p /data/calls \
    && chown agent /data/calls

WORKDIR /srv

# Dependencies and the package first, so a persona or model change does not reinstall them.
COPY pyproject.toml ./
COPY app/ ./app/
RUN pip install --no-cache-dir . && rm -rf ./app ./build ./*.egg-info

COPY prompts/ ./prompts/
COPY silero_vad.onnx ./

# Numeric, so a runtime that checks runAsNonRoot can tell without the passwd file.
USER 10001:10001
EXPOSE 8080
VOLUME ["/data/calls"]

# Liveness only: /health stays 200 while draining (readiness is /ready, for load balancers).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8080'), timeout=4)"]

# WORKERS=auto runs a worker per usable core (the container's CPU limit caps it), all on
# PORT; it needs REDIS_URL, which carries admin commands and events between the workers.
# SIGTERM starts the drain (in every worker): no new calls, live ones run up to
# DRAIN_TIMEOUT, then exit.
# Give the container at least that long to stop (docker stop -t, stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app", "serve"]
