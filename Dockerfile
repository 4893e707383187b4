FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir '.[postgres]'
COPY config/taskproxy.example.yaml ./config/taskproxy.example.yaml

# Mount a config at /app/config/taskproxy.yaml; pass secrets as environment variables.
# Relative paths in it (the SQLite file, the spool) land in /data, the working directory.
ENV TASKPROXY_CONFIG=/app/config/taskproxy.yaml
RUN mkdir /data && chown nobody /data
WORKDIR /data
VOLUME /data
EXPOSE 8080
USER nobody
CMD ["taskproxy", "serve", "--host", "0.0.0.0", "--port", "8080"]
