"""Train S3 with DeepSpeed ZeRO, tracked in MLflow.

    deepspeed --num_gpus 8 training/train.py --config training/configs/s3_mega.yaml [key=value ...]
    torchrun --nproc_per_node 8 training/train.py --config ...        # same thing
    python training/train.py --config ...                              # one process, no launcher

The loop is driven by the iteration count over infinite per-rank streams (no rank can run out of data first).
Every `checkpoint.every` iterations every rank saves; every `validation.every` iterations rank 0 consolidates the
fp32 weights, scores them on the DAVIS-format val split and logs them to MLflow as a model. A job relaunched
into the same output folder resumes from the latest complete checkpoint, same data stream, same MLflow run.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script by the launchers: sys.path[0] is training/, whose select.py would shadow the standard
    # library's `select` (imported by socket/subprocess). Put the repository root there instead.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(_here)]
    sys.path.insert(0, str(Path(_here).parent))

import argparse
import json
import logging
import math
import os
import resource
import socket
import time
from datetime import timedelta
from typing import Any

from training.config import BatchSplit, ConfigError, TrainConfig, load_config, split_global_batch  # noqa: E402

log = logging.getLogger("training.train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging; the last complete checkpoint is untouched."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train S3 with DeepSpeed ZeRO, tracked in MLflow.")
    p.add_argument("--config", required=True, help="training YAML (training/configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-4 train.iterations=1000")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_dist_env() -> None:
    """A plain `python train.py` is a world of one: give torch.distributed what a launcher would."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _ensure_dist_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:  # every configuration problem surfaces here, before DeepSpeed, the model or the data are touched
        cfg = load_config(args.config, args.overrides)
        split = split_global_batch(cfg, world)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    try:
        Trainer(cfg, split).run()
    except NonFiniteLossError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    return 0


def read_loss_log(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-iteration losses rank 0 appends to OUTPUT/losses.jsonl (resume checks, the demo summary)."""
    path = Path(output_dir) / "losses.jsonl"
    if not path.is_file():
        return []
    by_iteration = {}  # a job killed between checkpoints logs some iterations twice: the resumed run's count
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_iteration[record["iteration"]] = record
    return [by_iteration[k] for k in sorted(by_iteration)]


def _to_device(batch: dict[str, Any], device, float_dtype) -> dict[str, Any]:
    import torch

    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(float_dtype)
        out[k] = v
    return out


def _memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


class Trainer:
    def __init__(self, cfg: TrainConfig, split: BatchSplit):
        import deepspeed
        import torch
        import torch.distributed as dist

        from training import checkpoint, optim
        from training.tracking import Tracker

        self.cfg, self.split = cfg, split
        self.torch, self.dist = torch, dist
        on_gpu = torch.cuda.is_available()
        # A long timeout: the other ranks wait at a barrier while rank 0 validates.
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=timedelta(minutes=90))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
        if on_gpu:
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = cfg.checkpoint_dir

        # Auto-resume: the newest checkpoint that has its completion marker (never a half-written one).
        self.resume_from = checkpoint.latest_complete(self.ckpt_dir)
        marker = self.resume_from.marker() if self.resume_from else {}
        if self.resume_from and marker.get("config_hash") != cfg.hash() and self.rank == 0:
            log.warning("resuming %s written with config hash %s; this config hashes to %s",
                        self.resume_from.path, marker.get("config_hash"), cfg.hash())

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model_cfg, self.network, wrapper = self._build_model()
        optimizer = optim.build_optimizer(self.network, cfg)
        self.bf16 = optim.use_bf16(cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, config=optim.deepspeed_config(cfg, split))
        self.base_optimizer = optimizer

        self.tracker = Tracker(cfg, self.rank, marker.get("mlflow_run_id"))
        self.run_id = self._broadcast(self.tracker.run_id)
        self.iteration, self.nonfinite_in_a_row, self.nonfinite_total = 0, 0, 0
        self.loader = self._build_loader()
        if self.resume_from:
            state = checkpoint.load(self.engine, self.resume_from)
            self.iteration = int(state["iteration"])
            self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
            loader_state = checkpoint.this_ranks(state.get("loader_per_rank"))
            if loader_state is None:  # saved by a different world size: each rank's stream restarts, re-seeded
                log.warning("checkpoint %s was written by another world size; the data streams restart",
                            self.resume_from.path)
            else:
                self.loader.load_state_dict(loader_state)
            log.info("resumed from %s at iteration %d", self.resume_from.path, self.iteration)
        if self.rank == 0:
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            (self.out / "run_info.json").write_text(json.dumps({
                "mlflow_run_id": self.run_id, "tracking_uri": getattr(self.tracker, "tracking_uri", None),
                "world_size": self.world, "global_batch": split.global_batch, "micro_batch": split.micro_batch,
                "accumulation": split.accumulation, "engine_train_batch_size": self.engine.train_batch_size(),
                "zero_stage": self.engine.zero_optimization_stage(), "bf16": self.bf16,
                "resumed_from": str(self.resume_from.path) if self.resume_from else None}, indent=2))

    # ---------------------------------------------------------------------------------------- building

    def _build_model(self):
        import model
        from model.config import load_model_config
        from model.train_wrapper import ClipTrainer

        d = self.cfg.data
        overrides = {"num_frames": d.num_frames, "num_ref_frames": d.num_ref_frames, "num_objects": d.num_objects}
        overrides.update(self.cfg.model.overrides)
        model_cfg = load_model_config(self.cfg.model.name, overrides)
        network = model.build_network(model_cfg)
        return model_cfg, network, ClipTrainer(network, model_cfg)

    def _build_loader(self):
        from data_pipeline.loader import build_train_loader

        d = self.cfg.data
        return build_train_loader(
            shards=d.shards, batch_size=self.split.micro_batch, rank=self.rank, world_size=self.world,
            total_iterations=self.cfg.train.iterations * self.split.accumulation,
            num_frames=d.num_frames, num_objects=d.num_objects, crop_size=d.crop_size,
            max_skip=d.max_skip, max_skip_until=d.max_skip_until, num_workers=d.num_workers,
            seed=self.cfg.train.seed, infinite=True, **d.loader)

    def _broadcast(self, value):
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---------------------------------------------------------------------------------------- the loop

    def run(self) -> None:
        from training import optim

        cfg = self.cfg
        total, stop_at = cfg.train.iterations, cfg.train.stop_after or cfg.train.iterations
        it_loader = iter(self.loader)
        from tqdm import tqdm

        bar = tqdm(total=min(total, stop_at), initial=self.iteration, desc="train", unit="it", mininterval=5.0,
                   disable=self.rank != 0, dynamic_ncols=True)
        status = "KILLED"  # until the loop ends normally
        try:
            if self._owes_validation():  # the last run died while validating the checkpoint it resumed from
                self._validate()
            while self.iteration < min(total, stop_at):
                t_start = time.time()
                lr = optim.set_lr(self.base_optimizer, cfg, self.iteration)
                terms, data_wait = self._one_iteration(it_loader)
                self.iteration += 1
                self._record(terms, lr, data_wait, time.time() - t_start)
                bar.update(1)
                bar.set_postfix(loss=f"{terms.get('total_loss', float('nan')):.4f}", lr=f"{lr:.1e}", refresh=False)
                last = self.iteration in (total, stop_at)
                if self.iteration % cfg.checkpoint.every == 0 or last:
                    self._save()
                if cfg.validation.every and (self.iteration % cfg.validation.every == 0
                                             or (last and self.iteration == total and cfg.validation.at_end)):
                    self._validate()
            status = "FINISHED"
        except NonFiniteLossError:
            status = "FAILED"
            raise
        finally:
            bar.close()
            # A run stopped early (train.stop_after, an error) is continued by the relaunch: MLflow keeps its id.
            self.tracker.end(status)
            if status != "KILLED":  # every rank got here together (the non-finite check is all-reduced)
                self.dist.barrier()  # rank 0 has closed the MLflow run before any rank exits
                self.dist.destroy_process_group()

    def _one_iteration(self, it_loader) -> tuple[dict[str, float], float]:
        """One optimizer step = `accumulation` good micro-batches; a non-finite one is dropped and counted."""
        torch, cfg = self.torch, self.cfg
        done, data_wait, clips = 0, 0.0, 0
        sums: dict[str, float] = {}
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        while done < self.split.accumulation:
            t0 = time.time()
            batch = next(it_loader)
            data_wait += time.time() - t0
            # Seeded by (seed, iteration, micro-step, rank): the wrapper's random choices replay after a resume.
            torch.manual_seed(hash((cfg.train.seed, self.iteration, done, self.rank)) % 2**63)
            out = self.engine(_to_device(batch, self.device, dtype))
            loss = out["total_loss"]
            bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).item() else 1.0], device=self.device)
            self.dist.all_reduce(bad, op=self.dist.ReduceOp.MAX)  # every rank skips together, or none does
            if bad.item():
                self.nonfinite_in_a_row += 1
                self.nonfinite_total += 1
                log.warning("non-finite loss at iteration %d (%d in a row): micro-batch skipped",
                            self.iteration, self.nonfinite_in_a_row)
                if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_a_row} non-finite losses in a row at iteration {self.iteration} "
                        f"(train.max_nonfinite_in_a_row={cfg.train.max_nonfinite_in_a_row}); the last complete "
                        f"checkpoint in {self.ckpt_dir} is intact: lower optim.lr or check the data")
                continue
            self.nonfinite_in_a_row = 0
            self.engine.backward(loss)
            self.engine.step()
            done += 1
            clips += int(batch["rgb"].shape[0])
            for k, v in out.items():
                if k == "total_loss" or k.startswith("loss/"):
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float())
        terms = {k: v / self.split.accumulation for k, v in sums.items()}
        keys = sorted(terms)
        skipped = float(self.loader.skipped)  # bad samples/shards this rank's loader passed over
        vec = torch.tensor([terms[k] for k in keys] + [data_wait, skipped, clips], dtype=torch.float64,
                           device=self.device)
        self.dist.all_reduce(vec)
        vals = vec.tolist()
        n = len(keys)
        terms = {k: vals[i] / self.world for i, k in enumerate(keys)}
        terms["data_skipped"] = int(vals[n + 1])  # summed over ranks
        terms["clips"] = int(vals[n + 2])  # clips in this optimizer step over all ranks (= the global batch)
        return terms, vals[n] / self.world

    def _record(self, terms: dict[str, float], lr: float, data_wait: float, seconds: float) -> None:
        if self.rank != 0:
            return
        grad_norm = self.engine.get_global_grad_norm()
        with open(self.out / "losses.jsonl", "a") as f:
            f.write(json.dumps({"iteration": self.iteration, "lr": lr, **terms}) + "\n")
        if self.iteration % self.cfg.tracking.log_every and self.iteration != 1:
            return
        metrics = {f"train/{k.removeprefix('loss/')}" if k != "total_loss" else "train/loss": v
                   for k, v in terms.items() if k not in ("clips", "data_skipped")}
        metrics["data/loader_skipped"] = terms.get("data_skipped", 0)
        metrics.update({"train/lr": lr, "train/clips_per_s": self.split.global_batch / max(seconds, 1e-9),
                        "train/data_wait_s": data_wait, "train/seconds_per_it": seconds,
                        "train/memory_mb": _memory_mb(), "train/nonfinite_skipped": self.nonfinite_total})
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            metrics["train/grad_norm"] = float(grad_norm)
        self.tracker.log_metrics(metrics, step=self.iteration)
        log.info("it %d/%d loss %.4f lr %.2e %.2fs/it", self.iteration, self.cfg.train.iterations,
                 terms.get("total_loss", float("nan")), lr, seconds)

    # ---------------------------------------------------------------------------------------- checkpoints

    def _save(self):
        from training import checkpoint

        per_rank = checkpoint.gather_per_rank(self.loader.state_dict())  # ZeRO 0-2 keep rank 0's client state only
        client_state = {"iteration": self.iteration, "loader": per_rank[self.rank], "loader_per_rank": per_rank,
                        "mlflow_run_id": self.run_id, "config_hash": self.cfg.hash(),
                        "nonfinite_in_a_row": self.nonfinite_in_a_row}
        return checkpoint.save(self.engine, self.ckpt_dir, self.iteration, client_state, self.cfg.checkpoint.keep_last)

    def _validate(self) -> None:
        """Rank 0 scores the latest checkpoint's consolidated weights; the other ranks wait at the barrier."""
        from training import checkpoint
        from training.validation import validate_checkpoint

        ref = checkpoint.latest_complete(self.ckpt_dir)
        if ref is None or ref.iteration != self.iteration:
            ref = self._save()
        if self.rank == 0:
            validate_checkpoint(self.cfg, self.model_cfg, ref, self.tracker)
            with open(self.out / "validated.txt", "a") as f:  # read by _owes_validation after a relaunch
                f.write(ref.tag + "\n")
        self.dist.barrier()

    def _owes_validation(self) -> bool:
        """True (on every rank) when the resumed checkpoint is a validation point that was never validated."""
        v, total = self.cfg.validation, self.cfg.train.iterations
        if self.resume_from is None or not v.every:
            return False
        due = self.iteration % v.every == 0 or (self.iteration == total and v.at_end)
        owed = False
        if due and self.rank == 0:
            done = self.out / "validated.txt"
            owed = self.resume_from.tag not in (done.read_text().split() if done.is_file() else [])
        return bool(self._broadcast(owed))


if __name__ == "__main__":
    sys.exit(main())
