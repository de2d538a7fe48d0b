#!/usr/bin/env bash
# Convert the newest complete ZeRO checkpoint of a run to DeepSpeed's universal format, so that a job with a
# different number of GPUs can resume it (with checkpoint.load_universal=true; see cluster/README.md).
# DeepSpeed's converter runs through training.to_universal: a file holding pickled code is refused, never run.
#
#   cluster/deepspeed/to_universal.sh SRC_CKPT_DIR DST_CKPT_DIR [TAG]
#   cluster/deepspeed/to_universal.sh /shared/runs/s3_mega/checkpoints /shared/runs/s3_mega_universal/checkpoints
#
# SRC_CKPT_DIR holds iter_NNNNNNN/ folders written by training/checkpoint.py; TAG defaults to the newest one with a
# COMPLETE marker. DST_CKPT_DIR/TAG receives the universal checkpoint and, last, a copy of the marker (with
# "universal": true), so the trainer's auto-resume treats it like any complete checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 SRC_CKPT_DIR DST_CKPT_DIR [TAG]" >&2
    exit 2
fi
src=$1 dst=$2
tag=${3:-}
if [[ -z $tag ]]; then
    tag=$(find "$src" -mindepth 2 -maxdepth 2 -name COMPLETE -printf '%h\n' 2>/dev/null | xargs -r -n1 basename \
        | grep -E '^iter_[0-9]{7,}$' | sort | tail -n1 || true)
fi
if [[ -z $tag || ! -f $src/$tag/COMPLETE ]]; then
    echo "error: no complete checkpoint ${tag:-} in $src (a folder iter_NNNNNNN with a COMPLETE marker)" >&2
    exit 2
fi
if [[ -e $dst/$tag ]]; then
    echo "error: $dst/$tag exists; remove it first" >&2
    exit 2
fi
mkdir -p "$dst"
tmp="$dst/.$tag.partial"
rm -rf "$tmp"
echo "converting $src/$tag -> $dst/$tag (universal)" >&2
${PYTHON:-python} -m training.to_universal --input_folder "$src/$tag" --output_folder "$tmp" \
    --num_extract_workers "${WORKERS:-4}" --num_merge_workers "${WORKERS:-4}" --inject_missing_state
mv "$tmp" "$dst/$tag"
${PYTHON:-python} - "$src/$tag/COMPLETE" "$dst/$tag/COMPLETE" <<'PY'
import json, os, sys
marker = json.load(open(sys.argv[1]))
marker["universal"] = True
tmp = sys.argv[2] + ".tmp"
with open(tmp, "w") as f:
    json.dump(marker, f)
os.replace(tmp, sys.argv[2])
PY
echo "$dst/$tag"
