# syntax=docker/dockerfile:1
# Every image installs the versions pinned in constraints.txt (make constraints), so a rebuild gives the same ones.
# One Dockerfile, four images: `trainer` (TensorFlow, no broker or database clients), `worker` (adds
# Celery, Redis, SQLAlchemy, psycopg, Alembic), `review` (adds the web app) and `flower` (adds Flower).
# Each runs as a non-root user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=2
RUN groupadd --gid 10001 allscore \
 && useradd --uid 10001 --gid allscore --create-home --home-dir /home/allscore allscore
WORKDIR /home/allscore

# Build the wheel once; the runtime stages install it with the extras they need. The wheel holds the compiled
# decode kernel (core/_cellkernel.c), so this stage, and only this one, needs a C compiler.
FROM base AS wheel
RUN apt-get update \
 && apt-get install --yes --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY allscore ./allscore
COPY core ./core
COPY trainer ./trainer
COPY worker ./worker
COPY db ./db
RUN pip wheel --no-deps --wheel-dir /wheels . && cp constraints.txt /wheels/

FROM base AS trainer
COPY --from=wheel /wheels /wheels
RUN pip install --constraint /wheels/constraints.txt "$(ls /wheels/allscore-*.whl)[trainer-cpu]" && rm -rf /wheels
USER allscore
ENV ALLSCORE_HOME=/home/allscore/.allscore
ENTRYPOINT ["allscore"]
CMD ["--help"]

FROM base AS worker
COPY --from=wheel /wheels /wheels
RUN pip install --constraint /wheels/constraints.txt "$(ls /wheels/allscore-*.whl)[worker-cpu]" && rm -rf /wheels
USER allscore
ENV ALLSCORE_HOME=/home/allscore/.allscore \
    ALLSCORE_METRICS_PORT=9540
# /metrics (Prometheus) and /healthz. The health check asks the worker's own /healthz: healthy while its consumer
# is connected to the broker and consuming its queues (no message sent, no other worker asked).
EXPOSE 9540
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["python", "-m", "worker.health"]
ENTRYPOINT ["allscore"]
CMD ["worker"]

# The worker without TensorFlow (about a fifth of the worker image's size, and a process of about 230 MiB instead
# of about 950 at 64x64): ONNX Runtime serves each version's published model.onnx. `allscore models export REF`,
# run where TensorFlow is (the trainer image), adds the export to a version published before exports existed.
FROM base AS worker-onnx
COPY --from=wheel /wheels /wheels
RUN pip install --constraint /wheels/constraints.txt "$(ls /wheels/allscore-*.whl)[serve]" && rm -rf /wheels
USER allscore
ENV ALLSCORE_HOME=/home/allscore/.allscore \
    ALLSCORE_METRICS_PORT=9540 \
    ALLSCORE_RUNTIME=onnxruntime
EXPOSE 9540
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["python", "-m", "worker.health"]
ENTRYPOINT ["allscore"]
CMD ["worker"]

FROM base AS review
COPY --from=wheel /wheels /wheels
RUN pip install --constraint /wheels/constraints.txt "$(ls /wheels/allscore-*.whl)[review]" && rm -rf /wheels
USER allscore
ENV ALLSCORE_HOME=/home/allscore/.allscore
EXPOSE 8080
ENTRYPOINT ["allscore"]
CMD ["review", "--host", "0.0.0.0", "--port", "8080"]

FROM base AS flower
COPY --from=wheel /wheels /wheels
RUN pip install --constraint /wheels/constraints.txt "$(ls /wheels/allscore-*.whl)[serve,monitor]" && rm -rf /wheels
USER allscore
ENTRYPOINT ["celery", "--app", "worker.celery_app"]
CMD ["flower", "--port=5555"]
