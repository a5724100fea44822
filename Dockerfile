# The workers image: `lukhas worker slices` or `lukhas worker observability` (see compose.yaml).
#
# Two stages so the image builds on amd64 and arm64 alike: some dependencies (hdrhistogram)
# may have no wheel for the platform and build a C extension, which needs a compiler the slim
# image lacks. The builder has one and turns everything into wheels; the runtime stage installs
# those wheels only (--no-index), with no compiler in the final image.
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY lukhas ./lukhas
COPY bus ./bus
COPY workers ./workers
COPY candidate ./candidate
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=builder /wheels /wheels
RUN pip install --no-index --find-links=/wheels lukhas-slices \
    && rm -rf /wheels \
    && useradd --system --uid 10001 lukhas
WORKDIR /app
USER lukhas

# SIGTERM drains in-flight work and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lukhas"]
CMD ["worker", "slices"]
