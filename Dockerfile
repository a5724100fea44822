# The workers image: `lukhas worker slices` or `lukhas worker observability` (see compose.yaml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY lukhas ./lukhas
COPY bus ./bus
COPY workers ./workers
COPY candidate ./candidate
RUN pip install . && useradd --system --uid 10001 lukhas
USER lukhas

# SIGTERM drains in-flight work and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["lukhas"]
CMD ["worker", "slices"]
