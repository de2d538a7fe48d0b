"""One training rank as the launcher starts it (RANK / WORLD_SIZE in the environment): iterate the loader to the
end and write what it yielded to a JSON file. argv: shard_root out_json total_iterations num_workers."""

from __future__ import annotations

import json
import sys

from data_pipeline.loader import build_train_loader
from tests.loader.helpers import LOADER_KW


def main() -> None:
    root, out, total, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    loader = build_train_loader(root, batch_size=2, total_iterations=total, num_workers=workers, **LOADER_KW)
    keys, levels, shapes = [], [], []
    for batch in loader:
        keys.append([i["key"] for i in batch["info"]])
        levels.append(batch["info"][0]["level"])
        shapes.append(list(batch["rgb_u8"].shape))
    with open(out, "w") as f:
        json.dump({"rank": loader.rank, "world_size": loader.world_size, "batches": len(keys), "keys": keys,
                   "levels": levels, "shapes": shapes, "stats": loader.stats()}, f)


if __name__ == "__main__":
    main()
