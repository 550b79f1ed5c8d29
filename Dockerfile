# The streaming feature pipeline: `python -m dataflow.run` (a thin wrapper over
# `python -m bytewax.run dataflow.flow`; every bytewax.run flag passes through).
#
#   docker build -t search-features:local .
#   docker run --rm -p 3030:3030 -e KAFKA_BROKERS=... -e REDIS_URL=... search-features:local
#   docker run --rm search-features:local -w 2        # arguments go to bytewax.run
#
# Settings are environment variables (dataflow/config.py); docker-compose.yml and k8s/
# show complete sets. No Docker engine runs in CI: tests/deploy/test_deploy_files.py checks
# this file with a small parser instead.

# ---- build: a virtualenv with the package and its runtime dependencies only ----------
FROM python:3.12-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Every dependency ships manylinux wheels for CPython 3.12 (bytewax 0.21.1 has none for
# 3.13, hence 3.12). The package's own compiled core (dataflow/core/_native.c, built by
# setup.py) needs a C compiler here; the slim image already has Python's headers, and the
# runtime stage gets the built module inside the virtualenv, not the compiler.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md ./
COPY dataflow ./dataflow
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/python -c "import dataflow.core._native"

# ---- runtime -------------------------------------------------------------------------
FROM python:3.12-slim

LABEL org.opencontainers.image.title="search-features" \
      org.opencontainers.image.description="Streaming CTR and popularity features: Kafka -> Bytewax -> Redis and OpenSearch" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it and fsGroup can
# match it (k8s/statefulset.yaml uses 10001 too). The recovery directory is created
# here, owned by that user, so a fresh named volume mounted on it inherits the owner.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
    && mkdir -p /var/lib/search-features/recovery \
    && chown -R app:app /var/lib/search-features

COPY --from=build /opt/venv /opt/venv

# An empty working directory: bytewax.run puts the cwd first on sys.path, so a stray
# `dataflow/` here would shadow the installed package.
WORKDIR /var/lib/search-features

USER 10001:10001

# 3030: Prometheus /metrics (the Bytewax dataflow API, BYTEWAX_DATAFLOW_API_PORT).
# 2101: Bytewax process-to-process traffic when several processes form a cluster (-a).
EXPOSE 3030 2101

# Recovery partitions (SQLite) live here when RECOVERY_DIR points at it.
VOLUME ["/var/lib/search-features/recovery"]

# The slim image has no curl; the standard library is enough. The metrics server
# starts before the dataflow connects to its peers, so this says "the process is up",
# not "the cluster is processing" (that is what the Prometheus alerts are for). With
# METRICS_ENABLED=false there is no server: disable the healthcheck too.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('BYTEWAX_DATAFLOW_API_PORT', '3030'), timeout=4).read()"]

ENTRYPOINT ["python", "-m", "dataflow.run"]
