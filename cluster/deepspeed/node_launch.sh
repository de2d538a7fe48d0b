#!/usr/bin/env bash
# One node's part of a multi-node training run: start it once on EVERY node (train.slurm does, via srun with one
# task per node). No ssh between nodes: each node launches its own ranks and they meet at MASTER_ADDR:MASTER_PORT.
#
#   node_launch.sh CONFIG [key=value ...]          e.g. node_launch.sh training/configs/s3_mega.yaml data.shards=/shared/shards
#
# Reads (SLURM sets the first three; any can be given by hand):
#   SLURM_NNODES / NNODES          number of nodes
#   SLURM_NODEID / NODE_RANK       this node's rank, 0 .. NNODES-1
#   SLURM_JOB_NODELIST / NODELIST  the nodes (scontrol form "gpu[01-04]", or a plain comma list "a,b")
#   MASTER_ADDR                    default: the first node of the list
#   MASTER_PORT                    default: 29500 (+ SLURM_JOB_ID % 1000 to keep two jobs on a node apart)
#   GPUS_PER_NODE                  default: SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists
#   LAUNCHER                       deepspeed (default: `deepspeed --no_ssh --node_rank`) or torchrun (c10d rendezvous)
#   TRAIN_SCRIPT                   default: training/train.py (what each rank runs, with --config CONFIG ...)
#   ENV_FILE                       default: cluster/deepspeed/nccl.env (its variables that are not already set
#                                  in the environment are exported before the launch)
set -euo pipefail
if [[ $# -lt 1 ]]; then
    echo "usage: $0 CONFIG [key=value ...]" >&2
    exit 2
fi
config=$1
shift
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

nnodes=${NNODES:-${SLURM_NNODES:?set SLURM_NNODES or NNODES}}
node_rank=${NODE_RANK:-${SLURM_NODEID:?set SLURM_NODEID or NODE_RANK}}
nodelist=${NODELIST:-${SLURM_JOB_NODELIST:?set SLURM_JOB_NODELIST or NODELIST}}
if command -v scontrol >/dev/null 2>&1; then
    hosts=$(scontrol show hostnames "$nodelist")
elif [[ $nodelist == *"["* ]]; then
    echo "error: NODELIST '$nodelist' uses SLURM's range syntax but scontrol is not available" >&2
    exit 2
else
    hosts=$(tr ',' '\n' <<<"$nodelist")
fi
if [[ $(wc -l <<<"$hosts") -ne $nnodes ]]; then
    echo "error: $nnodes nodes expected but the node list '$nodelist' names $(wc -l <<<"$hosts")" >&2
    exit 2
fi
master_addr=${MASTER_ADDR:-$(head -n1 <<<"$hosts")}
master_port=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
if [[ -z ${GPUS_PER_NODE:-} ]]; then
    GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
fi
if [[ $GPUS_PER_NODE -lt 1 ]]; then
    echo "error: no GPUs found on $(hostname); set GPUS_PER_NODE" >&2
    exit 2
fi

env_file=${ENV_FILE:-$repo/cluster/deepspeed/nccl.env}
if [[ -f $env_file ]]; then
    # KEY=VALUE lines; a variable already set in the job's environment wins over the file.
    while IFS='=' read -r key value; do
        [[ -n ${!key+x} ]] || export "$key=$value"
    done < <(grep -E '^[A-Za-z_][A-Za-z0-9_]*=' "$env_file")
fi

launcher=${LAUNCHER:-deepspeed}
script=${TRAIN_SCRIPT:-training/train.py}
echo "[node $node_rank/$nnodes on $(hostname)] $launcher: $GPUS_PER_NODE ranks, master $master_addr:$master_port" >&2
case $launcher in
deepspeed)
    # DeepSpeed wants the whole world in a hostfile even without ssh: every node writes the same one.
    hostfile=$(mktemp "${TMPDIR:-/tmp}/s3vos-hostfile.XXXXXX")
    trap 'rm -f "$hostfile"' EXIT
    sed "s/\$/ slots=$GPUS_PER_NODE/" <<<"$hosts" >"$hostfile"
    ${DEEPSPEED:-deepspeed} --hostfile "$hostfile" --no_ssh --num_nodes "$nnodes" --node_rank "$node_rank" \
        --num_gpus "$GPUS_PER_NODE" --master_addr "$master_addr" --master_port "$master_port" \
        "$script" --config "$config" "$@"
    ;;
torchrun)
    ${TORCHRUN:-torchrun} --nnodes "$nnodes" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$node_rank" \
        --rdzv_backend c10d --rdzv_endpoint "$master_addr:$master_port" --rdzv_id "${SLURM_JOB_ID:-s3vos}" \
        --rdzv_conf "is_host=$([[ $node_rank == 0 ]] && echo true || echo false)" \
        "$script" --config "$config" "$@"
    ;;
*)
    echo "error: LAUNCHER must be deepspeed or torchrun, got '$launcher'" >&2
    exit 2
    ;;
esac
