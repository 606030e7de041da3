#!/usr/bin/env bash
# The MLflow tracking server: SQLite backend store and a local artifact root, bound to loopback.
#   bash mlflow/server.sh            # http://127.0.0.1:5000
#   MLFLOW_PORT=5001 bash mlflow/server.sh
# Point the pipeline at it with MLFLOW_TRACKING_URI=http://127.0.0.1:5000 (or tracking.uri in params.yaml).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-python}" -m mlflow server \
  --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "sqlite:///${here}/mlflow.db" \
  --artifacts-destination "${here}/artifacts" \
  --workers "${MLFLOW_WORKERS:-2}"
