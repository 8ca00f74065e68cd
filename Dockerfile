# syntax=docker/dockerfile:1
# One image for every recstack process (stream consumer, ranking server, trainer); the command
# picks the job, e.g. `recstack serve`. Used by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_LINK_MODE=copy \
    UV_SYSTEM_PYTHON=1

RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /app

# Dependencies first, in their own layer: rebuilt only when the pins change, not on every code edit.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install -c constraints.txt -r pyproject.toml

# The project itself, with its gRPC stubs generated from proto/ (they are not in git).
COPY . .
RUN python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
        proto/recstack/v1/ranking.proto \
    && { [ -f recstack/v1/__init__.py ] || touch recstack/v1/__init__.py; } \
    && uv pip install --no-deps -c constraints.txt . \
    && useradd --system --uid 10001 --home-dir /app recstack \
    && mkdir -p /app/artifacts/models /app/data/events \
    && chown -R recstack /app/artifacts /app/data

USER recstack
EXPOSE 50051 9464 9465
CMD ["recstack", "--help"]
