"""DeepSpeed's `ds_to_universal` converter with every checkpoint file read under `refuse_pickled_code`: the
checkpoint being converted is a file the user points at, and DeepSpeed reads it with torch.load(weights_only=False).
cluster/deepspeed/to_universal.sh runs this module; its arguments are ds_to_universal's own.

    python -m training.to_universal --input_folder SRC/iter_0001000 --output_folder DST/iter_0001000 ...
"""

from __future__ import annotations

import multiprocessing
import pickle
import sys

from training.checkpoint import refuse_pickled_code


def main(argv: list[str] | None = None) -> int:
    # The converter's worker processes must inherit the guard: fork carries the patched torch.load over, spawn
    # would start them with the real one.
    multiprocessing.set_start_method("fork", force=True)
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    args = ds_to_universal.parse_arguments()
    try:
        with refuse_pickled_code():
            ds_to_universal.main(args)
    except pickle.UnpicklingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
