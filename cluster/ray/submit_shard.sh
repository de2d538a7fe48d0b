#!/usr/bin/env bash
# Submit the sharding job to a running Ray cluster (ray up / KubeRay / `ray start --head`).
#
#   cluster/ray/submit_shard.sh HEAD_ADDRESS DATA_ROOT OUT [key=value ...]
#   cluster/ray/submit_shard.sh http://127.0.0.1:8265 /shared/vos /shared/shards
#
# Run from anywhere; the job ships this checkout as its working_dir (cluster/ray/runtime_env.yaml) and runs
# `python -m data_pipeline.shard` on the head; its tasks spread over every worker. SHARD_CONFIG picks the data
# config (default data_pipeline/configs/mega.yaml). A stable --submission-id per output folder makes a rerun of the
# same dataset version visible in `ray job list`; the job itself is resumable (finished shards are skipped), so
# resubmitting after a failure finishes the work. Pass `--no-wait` via SUBMIT_FLAGS to return at once.
set -euo pipefail
if [[ $# -lt 3 ]]; then
    echo "usage: $0 HEAD_ADDRESS DATA_ROOT OUT [key=value ...]" >&2
    exit 2
fi
address=$1 data_root=$2 out=$3
shift 3
repo=$(cd "$(dirname "$0")/../.." && pwd)
config=${SHARD_CONFIG:-data_pipeline/configs/mega.yaml}
submission_id=${SUBMISSION_ID:-s3vos-shard-$(basename "$out")-$(date +%Y%m%d-%H%M%S)}
cd "$repo"
# shellcheck disable=SC2086
exec ray job submit --address "$address" --submission-id "$submission_id" \
    --runtime-env "${RUNTIME_ENV:-cluster/ray/runtime_env.yaml}" ${SUBMIT_FLAGS:-} -- \
    python -m data_pipeline.shard --config "$config" --data-root "$data_root" --out "$out" "$@"
