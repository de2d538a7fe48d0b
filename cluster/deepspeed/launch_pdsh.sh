#!/usr/bin/env bash
# Multi-node training over ssh with DeepSpeed's own launcher (pdsh): run on the first node of the hostfile.
#
#   cluster/deepspeed/launch_pdsh.sh HOSTFILE CONFIG [key=value ...]
#   cluster/deepspeed/launch_pdsh.sh cluster/deepspeed/hostfile.example training/configs/s3_mega.yaml \
#       data.shards=/shared/shards output_dir=/shared/runs/s3_mega validation.root=/shared/vos/DAVIS
#
# Needs: passwordless ssh from this node to every node of HOSTFILE, pdsh installed here, the repository and its
# .venv at the same path on every node (the shared filesystem is the easy way), /shared mounted everywhere.
# DeepSpeed exports NCCL_*, MLFLOW_* and PYTHON* variables to the other nodes by itself; the rest of
# nccl.env (OMP_NUM_THREADS, TORCH_NCCL_*, GLOO_*) travels through DS_ENV_FILE.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 HOSTFILE CONFIG [key=value ...]" >&2
    exit 2
fi
hostfile=$(realpath "$1") config=$2
shift 2
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
export PATH=${VENV:-$repo/.venv}/bin:$PATH
envfile=$(mktemp "${TMPDIR:-/tmp}/s3vos-dsenv.XXXXXX")
trap 'rm -f "$envfile"' EXIT
grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "${ENV_FILE:-cluster/deepspeed/nccl.env}" >"$envfile"
export DS_ENV_FILE=$envfile
first_host=$(grep -vE '^\s*(#|$)' "$hostfile" | head -n1 | awk '{print $1}')
deepspeed --hostfile "$hostfile" --launcher pdsh --master_addr "${MASTER_ADDR:-$first_host}" \
    --master_port "${MASTER_PORT:-29500}" training/train.py --config "$config" "$@"
