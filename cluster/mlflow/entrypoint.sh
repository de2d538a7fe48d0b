#!/usr/bin/env bash
# Starts the tracking server with authentication on (basic-auth app), PostgreSQL for runs and users, and the
# S3-compatible bucket for artifacts, proxied by the server (clients need no bucket credentials; multi-GB
# checkpoints go up in parts: see client.env). Every setting comes from the environment (compose file / Secret):
#   POSTGRES_HOST POSTGRES_PORT POSTGRES_USER POSTGRES_PASSWORD MLFLOW_DB MLFLOW_AUTH_DB
#   MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)  MLFLOW_S3_ENDPOINT_URL (MinIO/Ceph; unset for AWS S3)
#   AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
#   MLFLOW_ADMIN_USERNAME MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
#   MLFLOW_ALLOWED_HOSTS (the Host headers clients send: every name:port they use; default below)  MLFLOW_WORKERS
set -euo pipefail
: "${POSTGRES_PASSWORD:?}" "${MLFLOW_ADMIN_PASSWORD:?}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?}"
db="postgresql://${POSTGRES_USER:-mlflow}:${POSTGRES_PASSWORD}@${POSTGRES_HOST:-postgres}:${POSTGRES_PORT:-5432}"

# The auth app's config: users/permissions in their own database; everyone else reads, owners edit.
export MLFLOW_AUTH_CONFIG_PATH=/tmp/basic_auth.ini
umask 077
cat >"$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = ${db}/${MLFLOW_AUTH_DB:-mlflow_auth}
admin_username = ${MLFLOW_ADMIN_USERNAME:-admin}
admin_password = ${MLFLOW_ADMIN_PASSWORD}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI

# MLflow answers only requests whose Host header is listed (DNS-rebinding protection; exact "name:port" strings
# or fnmatch patterns such as "*.corp.internal:5000", comma-separated). Unset, that is the names the server has
# on its own machine: localhost, 127.0.0.1 and this machine's (container's, pod's) host name, bare and with :5000.
# Clients on other machines reach it by another name: list it in MLFLOW_ALLOWED_HOSTS (server.env.example).
# "*" turns the check off.
self=$(uname -n)
allowed_hosts="${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:5000,127.0.0.1,127.0.0.1:5000,${self},${self}:5000}"

# 0.0.0.0 is the container's own network namespace, not the host's: docker's port publishing and a Kubernetes
# Service forward to the container's interface, so a server on 127.0.0.1 here could not be reached at all. Who
# can reach it from outside is decided there: docker-compose.yaml publishes on the host's 127.0.0.1 unless
# MLFLOW_PUBLISH_ADDR says otherwise; the k8s Service is cluster-internal.
exec mlflow server \
    --host 0.0.0.0 --port 5000 \
    --app-name basic-auth \
    --backend-store-uri "${db}/${MLFLOW_DB:-mlflow}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:?}" \
    --serve-artifacts \
    --workers "${MLFLOW_WORKERS:-4}" \
    --allowed-hosts "${allowed_hosts}" \
    "$@"
