"""What one rank sees after a multi-node launch (used by test_launch_scripts.py in place of training/train.py).

Joins the process group the launcher set up (gloo), all-reduces its rank, and writes what it found to
OUT/rank<RANK>.json: the distributed env, the all-reduce result and the environment variables the launch exported.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--local_rank", "--local-rank", type=int, default=None)
p.add_argument("overrides", nargs="*")
args = p.parse_args()
out = Path(dict(o.split("=", 1) for o in args.overrides)["out"])

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank())])
dist.all_reduce(t)
record = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                         "OMP_NUM_THREADS", "NCCL_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                                         "GLOO_SOCKET_IFNAME")}
record.update(rank=dist.get_rank(), world=dist.get_world_size(), allreduce=t.item(), config=args.config)
(out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
dist.barrier()
dist.destroy_process_group()
