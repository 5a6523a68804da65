# The operator image: slim Python, the `operator` extra only (no torch), runs as a non-root user.
# docker build -t ghcr.io/spa-operator/spa-operator:0.1.0 .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY operator ./operator
COPY workers ./workers
RUN pip install ".[operator]" && rm -rf /root/.cache

RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin spa
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["spa-operator"]
