"""Run training as `training/train.py` does (world of one), saving the network's weights as the first iteration
sees them: after `model.init_from` and the DeepSpeed engine's set-up, before any step.

    python tests/training/init_probe.py OUT.pt --config CONFIG key=value ...
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import model  # noqa: E402,F401  (torchvision shim before timm)
from training import train  # noqa: E402
from training.config import load_config, split_global_batch  # noqa: E402


def main(argv: list[str]) -> int:
    out, args = Path(argv[0]), train.parse_args(argv[1:])
    train._ensure_dist_env()
    cfg = load_config(args.config, args.overrides)
    trainer = train.Trainer(cfg, split_global_batch(cfg, 1))
    torch.save({k: v.detach().clone() for k, v in trainer.network.state_dict().items()}, out)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
