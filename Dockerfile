# syntax=docker/dockerfile:1
# The twophase image: one image, every role. The command picks the role:
#   docker run IMAGE coordinator
#   docker run IMAGE participant --app twophase.bank:from_env
# Configuration comes from TWOPHASE_* and the standard OTEL_* environment variables
# (see runtime/config.py and compose/docker-compose.yml).

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/twophase
WORKDIR /src
# pyproject.toml names README.md as the readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY runtime ./runtime
COPY coordinator ./coordinator
COPY participant ./participant
COPY twophase ./twophase
# [tracing]: the OTLP exporter, for the OTEL_EXPORTER_OTLP_* variables compose sets
RUN /opt/twophase/bin/pip install '.[tracing]'

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/twophase/bin:$PATH \
    TWOPHASE_DATA_DIR=/var/lib/twophase
COPY --from=build /opt/twophase /opt/twophase
# Non-root: a system user that owns only the data directory (default SQLite logs live there
# when TWOPHASE_LOG_URL is not a database URL; mount a volume on it to keep them).
RUN groupadd --system --gid 10001 twophase \
    && useradd --system --uid 10001 --gid twophase --home-dir /var/lib/twophase \
       --shell /usr/sbin/nologin twophase \
    && mkdir -p /var/lib/twophase \
    && chown twophase:twophase /var/lib/twophase
USER twophase:twophase
WORKDIR /var/lib/twophase
VOLUME ["/var/lib/twophase"]
# Prometheus metrics (TWOPHASE_METRICS_PORT, coordinator default 9464).
EXPOSE 9464
ENTRYPOINT ["twophase"]
CMD ["--help"]
