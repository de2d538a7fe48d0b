#!/usr/bin/env bash
# Starts the tracking server with authentication on (basic-auth app), PostgreSQL for runs and users, and the
# S3-compatible bucket for artifacts, proxied by the server (clients need no bucket credentials; multi-GB
# checkpoints go up in parts: see client.env). Every setting comes from the environment (compose file / Secret):
#   POSTGRES_HOST POSTGRES_PORT POSTGRES_USER POSTGRES_PASSWORD MLFLOW_DB MLFLOW_AUTH_DB
#   MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix)  MLFLOW_S3_ENDPOINT_URL (MinIO/Ceph; unset for AWS S3)
#   AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
#   MLFLOW_ADMIN_USERNAME MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
#   MLFLOW_ALLOWED_HOSTS (the names clients use to reach the server)  MLFLOW_WORKERS
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

exec mlflow server \
    --host 0.0.0.0 --port 5000 \
    --app-name basic-auth \
    --backend-store-uri "${db}/${MLFLOW_DB:-mlflow}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS_DESTINATION:?}" \
    --serve-artifacts \
    --workers "${MLFLOW_WORKERS:-4}" \
    --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-*}" \
    "$@"
