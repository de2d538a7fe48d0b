"""Train S3 with DeepSpeed ZeRO, tracked in MLflow.

    deepspeed --num_gpus 8 training/train.py --config training/configs/s3_mega.yaml [key=value ...]
    torchrun --nproc_per_node 8 training/train.py --config ...        # same thing
    python training/train.py --config ...                              # one process, no launcher

The loop is driven by the iteration count over infinite per-rank streams (no rank can run out of data first).
Every `checkpoint.every` iterations every rank saves; every `validation.every` iterations rank 0 consolidates the
fp32 weights, every rank scores its share of the DAVIS-format val sequences on its own device, and rank 0 logs
the reduced J&F to MLflow with the model. A job relaunched into the same output folder resumes from the latest
complete checkpoint, same data stream, same MLflow run, on any world size (the streams and the curriculum follow
the global iteration).

Stopping (training/lifecycle.py): SIGUSR1/SIGTERM, the file named by S3VOS_STOP_FILE or the death of the launcher
make every rank write a checkpoint at the end of the current iteration and exit 0; a second trainer on the same
output folder is refused; a resume whose config differs from the checkpoint's is refused unless
--allow-config-change (the change is logged into the same MLflow run).

Exit codes: 0 done or stopped with a checkpoint, 2 configuration/provenance/lock error (before any heavy work),
3 diverged (non-finite losses), 4 disk full (or a file write that failed, as torch.save reports a full disk:
"unexpected pos N vs M"; the incomplete checkpoint is removed and the MLflow run marked FAILED). Each is one line
on stderr starting with "error:" / "configuration error:" / "training stopped:"; --debug adds the traceback.
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
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from training.config import (  # noqa: E402
    OPERATIONAL_KEYS,
    BatchSplit,
    ConfigError,
    TrainConfig,
    load_config,
    split_global_batch,
)

log = logging.getLogger("training.train")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging; the last complete checkpoint is untouched."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train S3 with DeepSpeed ZeRO, tracked in MLflow.")
    p.add_argument("--config", required=True, help="training YAML (training/configs/*.yaml)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the config differs from the checkpoint's (the change is logged to MLflow)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error too")
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
    from model import cli
    from training import lifecycle

    args = parse_args(argv)
    launched = "RANK" in os.environ  # started by a launcher (deepspeed, torchrun, srun), not by hand
    _ensure_dist_env()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:  # every configuration problem surfaces here, before DeepSpeed, the model or the data are touched
        cfg = load_config(args.config, args.overrides)
        split = split_global_batch(cfg, world)
        check_model(cfg)
        resume = check_resume(cfg, args.allow_config_change)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    lock = None
    if rank == 0:
        try:  # output_dir cannot be created or written (read-only, a file in the way): one line, exit 2
            with cli.about("output_dir", cfg.output_dir, "cannot create the output folder or its lock file"):
                lock = lifecycle.OutputLock(cfg.output_dir).acquire()
        except lifecycle.OutputInUse as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except cli.CliError as e:
            return cli.report(e, e.code, str(e), debug=args.debug)
    stop = lifecycle.StopRequest.from_env(launched).install()
    try:
        Trainer(cfg, split, stop=stop, resume=resume).run()
    except NonFiniteLossError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except Exception as e:
        message = lifecycle.disk_full(e, [cfg.output_dir, cfg.checkpoint_dir])
        if message is None:
            raise
        return cli.report(e, 4, message, debug=args.debug)
    finally:
        stop.close()
        if lock is not None:
            lock.release()
    if stop.reason:
        print(f"stopped ({stop.reason}) after writing a checkpoint; relaunch the same command to resume",
              file=sys.stderr)
    return 0


def check_model(cfg: TrainConfig) -> None:
    """The model config loads and the weight files it reads (the ViT, the ImageNet ResNets) are there: a missing
    file stops the job here, naming the key, not after DeepSpeed started."""
    from model.config import load_model_config
    from model.network import check_weight_files

    try:
        check_weight_files(load_model_config(cfg.model.name, cfg.model.overrides), set_prefix="model.overrides.")
    except FileNotFoundError as e:
        raise ConfigError("model.overrides", f"model {cfg.model.name}: {e}") from e
    except ValueError as e:
        raise ConfigError("model", str(e)) from e


@dataclass
class ResumePlan:
    """What the files say before any heavy work: the checkpoint to resume (or None) and an allowed config change."""

    ref: Any = None
    marker: dict[str, Any] = field(default_factory=dict)
    config_change: list[tuple[str, Any, Any]] = field(default_factory=list)


def check_resume(cfg: TrainConfig, allow_config_change: bool) -> ResumePlan:
    """Read the checkpoint folder and refuse, with a ConfigError, what would silently train the wrong thing:
    load_universal without a universal checkpoint, or a resume whose config differs (unless allowed)."""
    from training import checkpoint, lifecycle

    ckpt_dir = cfg.checkpoint_dir
    ref = checkpoint.latest_complete(ckpt_dir)
    if cfg.checkpoint.load_universal and ref is None:
        why = "does not exist" if not ckpt_dir.is_dir() else "holds no complete checkpoint (iter_*/COMPLETE)"
        raise ConfigError("checkpoint.dir", f"checkpoint.load_universal=true but {ckpt_dir} {why}; point "
                          "checkpoint.dir at the output of cluster/deepspeed/to_universal.sh")
    if ref is None:
        return ResumePlan()
    marker = ref.marker()
    plan = ResumePlan(ref, marker)
    if marker.get("config_hash") == cfg.hash():
        return plan
    old = marker.get("config")
    if old is None:
        diff = [("<config>", f"hash {marker.get('config_hash')}", f"hash {cfg.hash()}")]
    else:
        old = lifecycle.with_later_keys(old)
        diff = lifecycle.config_diff(old, cfg.to_dict(), ignore=OPERATIONAL_KEYS)
    if not diff:
        return plan
    if not allow_config_change:
        raise ConfigError(diff[0][0], f"resuming {ref.path} with a changed config: {lifecycle.format_diff(diff)}. "
                          "Relaunch with the checkpoint's values, or pass --allow-config-change to continue the "
                          "same run with the new ones (the change is logged to its MLflow run)")
    plan.config_change = diff
    return plan


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
    """The loader's batch (uint8 frames, colour jitter still to apply) onto the device, finished there into the
    model's batch (data_pipeline.loader.finish_batch, in float32), its floating tensors then cast to float_dtype."""
    import torch

    from data_pipeline.loader import finish_batch

    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    out = finish_batch(moved)
    return {k: v.to(float_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in out.items()}


def _memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak RSS (Linux reports KiB)


def _dist_timeout(cfg: TrainConfig) -> timedelta:
    """Collectives wait this long: past the validation time bound (ranks meet after validating), else 30 min."""
    minutes = cfg.validation.time_limit_minutes
    return timedelta(minutes=(minutes + 30) if minutes else 24 * 60) if cfg.validation.every else timedelta(minutes=30)


class Trainer:
    def __init__(self, cfg: TrainConfig, split: BatchSplit, stop=None, resume: ResumePlan | None = None):
        import deepspeed
        import torch
        import torch.distributed as dist

        from training import checkpoint, lifecycle, optim
        from training.tracking import Tracker

        self.cfg, self.split = cfg, split
        self.stop = stop or lifecycle.StopRequest(watch_launcher=False)
        self.torch, self.dist = torch, dist
        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # CPU ranks: DeepSpeed's one compiled op, from the venv (make install built it ahead)
            from training import ds_ops

            ds_ops.prepare(int(os.environ.get("RANK", "0")))
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", timeout=_dist_timeout(cfg))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
        if on_gpu:
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = cfg.checkpoint_dir

        # Auto-resume: the newest checkpoint that has its completion marker (never a half-written one), as
        # check_resume found it before DeepSpeed started (a config change there was refused or allowed).
        plan = resume if resume is not None else check_resume(cfg, allow_config_change=False)
        self.resume_from, marker = plan.ref, plan.marker

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        self.model_cfg, self.network, wrapper = self._build_model()
        self.init_report = self._init_from() if cfg.model.init_from and self.resume_from is None else None
        self.sync_bn_layers = 0
        if cfg.model.sync_batchnorm and self.world > 1:
            import model

            self.sync_bn_layers = model.sync_batchnorm(self.network)
            wrapper = self._rewrap(wrapper)
        optimizer = optim.build_optimizer(self.network, cfg)
        self.bf16 = optim.use_bf16(cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=wrapper, optimizer=optimizer, config=optim.deepspeed_config(cfg, split))
        self.base_optimizer = optimizer

        self.tracker = Tracker(cfg, self.rank, marker.get("mlflow_run_id"))
        self.run_id = self._broadcast(self.tracker.run_id)
        if plan.config_change and self.rank == 0:
            self._log_config_change(plan)
        if self.init_report is not None and self.rank == 0 and self.tracker.enabled:
            self.tracker.mlflow.log_dict(self.init_report, "config/init_from.json")
        self.lineage = self._lineage() if self.rank == 0 else {}
        self.iteration, self.nonfinite_in_a_row, self.nonfinite_total = 0, 0, 0
        self.loader = self._build_loader()
        if self.resume_from:
            state = checkpoint.load(self.engine, self.resume_from)
            self.iteration = int(state["iteration"])
            self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
            loader_state = checkpoint.this_ranks(state.get("loader_per_rank"))
            if loader_state is None:
                # Saved by another world size: each rank's stream is a function of its batch count, so it goes on
                # where a job of this world size would be at this iteration, curriculum level included.
                self.loader.iteration = self.iteration * self.split.accumulation
                log.warning("checkpoint %s was written by another world size; the data streams continue at "
                            "iteration %d (curriculum level %s)", self.resume_from.path, self.iteration,
                            self.loader.level_at(self.loader.iteration))
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
                "precision": f"autocast {optim.autocast_dtype(cfg)}, fp32 parameters" if self.bf16 else "fp32",
                "sync_batchnorm_layers": self.sync_bn_layers, "lineage": self.lineage,
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

    def _rewrap(self, wrapper):
        """The training wrapper registers the network's children as its own: rebuild it after they changed."""
        from model.train_wrapper import ClipTrainer

        return ClipTrainer(self.network, self.model_cfg) if isinstance(wrapper, ClipTrainer) else wrapper

    def _init_from(self) -> dict[str, Any]:
        """model.init_from: load the matching modules of a converted Cutie/S3 checkpoint; report what loaded."""
        from model.weights import format_init_report, init_from_checkpoint

        report = init_from_checkpoint(self.network, self.cfg.model.init_from)
        if self.rank == 0:
            log.info("model.init_from %s: %s", self.cfg.model.init_from, format_init_report(report))
        return report

    def _lineage(self) -> dict[str, str]:
        """Stage 0 → main training: the run's stage and what its weights started from, as MLflow tags (rank 0)."""
        from training import lineage

        client = self.tracker.mlflow.MlflowClient() if self.tracker.enabled else None
        tags = lineage.run_tags(self.cfg, client)
        if lineage.STAGE0 in tags:
            log.info("stage 0: %s", tags[lineage.STAGE0])
        if self.tracker.enabled:
            self.tracker._call("tag_lineage", self.tracker.mlflow.set_tags, tags)
        return tags

    def _log_config_change(self, plan: ResumePlan) -> None:
        """--allow-config-change: the change goes into the same MLflow run, next to the resolved config."""
        from training import lifecycle

        text = lifecycle.format_diff(plan.config_change)
        log.warning("resuming %s with a changed config (--allow-config-change): %s", plan.ref.path, text)
        change = {"iteration": plan.ref.iteration, "from_config_hash": plan.marker.get("config_hash"),
                  "to_config_hash": self.cfg.hash(),
                  "changes": [{"key": k, "old": o, "new": n} for k, o, n in plan.config_change]}
        with open(self.out / "config_changes.jsonl", "a") as f:
            f.write(json.dumps(change, default=str) + "\n")
        if self.tracker.enabled:
            name = f"config/change_at_iter_{plan.ref.iteration:07d}"
            self.tracker._call("log_config_change", self.tracker.mlflow.log_dict, change, name + ".json")
            self.tracker._call("log_config", self.tracker.mlflow.log_text, self.cfg.to_yaml(), name + ".yaml")
            self.tracker._call("tag_config", self.tracker.mlflow.set_tag, "config_hash", self.cfg.hash())

    def _build_loader(self):
        from data_pipeline.loader import build_train_loader

        d = self.cfg.data
        return build_train_loader(
            shards=d.shards, batch_size=self.split.micro_batch, rank=self.rank, world_size=self.world,
            total_iterations=self.cfg.train.iterations * self.split.accumulation,
            num_frames=d.num_frames, num_objects=d.num_objects, crop_size=d.crop_size,
            max_skip=d.max_skip, max_skip_until=d.max_skip_until, num_workers=d.num_workers,
            seed=self.cfg.train.seed, infinite=True, verify_shards=d.verify_shards, kind=d.kind, **d.loader)

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
        # FAILED unless the loop ends normally or every rank agreed to stop; a run stopped early (train.stop_after,
        # a stop request) is continued by the relaunch: MLflow keeps its id and the new job marks it RUNNING again.
        status, together = "FAILED", False
        try:
            if self._owes_validation():  # the last run died while validating the checkpoint it resumed from
                self._validate()
            while self.iteration < min(total, stop_at):
                t_start = time.time()
                lr = optim.set_lr(self.base_optimizer, cfg, self.iteration)
                terms, data_wait = self._one_iteration(it_loader)
                stopping = terms.pop("stop", 0) > 0  # all-reduced: every rank sees the same value
                self.iteration += 1
                self._record(terms, lr, data_wait, time.time() - t_start)
                bar.update(1)
                bar.set_postfix(loss=f"{terms.get('total_loss', float('nan')):.4f}", lr=f"{lr:.1e}", refresh=False)
                last = self.iteration in (total, stop_at)
                if self.iteration % cfg.checkpoint.every == 0 or last or stopping:
                    self._save()
                if stopping:
                    log.warning("stopped at iteration %d (%s); checkpoint %s written", self.iteration,
                                self.stop.reason or "a stop request on another rank",
                                self.ckpt_dir / f"iter_{self.iteration:07d}")
                    self.stop.reason = self.stop.reason or "a stop request on another rank"
                    status, together = "KILLED", True
                    break
                if cfg.validation.every and (self.iteration % cfg.validation.every == 0
                                             or (last and self.iteration == total and cfg.validation.at_end)):
                    self._validate()
            else:
                status, together = "FINISHED", True
        except NonFiniteLossError:
            together = True  # the non-finite check is all-reduced: every rank raises at the same iteration
            raise
        finally:
            bar.close()
            self.tracker.end(status)
            if together:
                self.dist.barrier()  # rank 0 has closed the MLflow run before any rank exits
                self.dist.destroy_process_group()

    def _one_iteration(self, it_loader) -> tuple[dict[str, float], float]:
        """One optimizer step = `accumulation` good micro-batches; a non-finite one is dropped and counted."""
        from training import optim

        torch, cfg = self.torch, self.cfg
        done, data_wait, clips = 0, 0.0, 0
        sums: dict[str, float] = {}
        dtype = optim.input_dtype(cfg)  # fp32 inputs and parameters; bf16 compute under autocast (optim docstring)
        while done < self.split.accumulation:
            t0 = time.time()
            batch = next(it_loader)
            data_wait += time.time() - t0
            # Seeded by (seed, iteration, micro-step, rank): the wrapper's random choices replay after a resume.
            torch.manual_seed(hash((cfg.train.seed, self.iteration, done, self.rank)) % 2**63)
            with optim.forward_context(cfg, self.device):
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
            clips += len(batch["info"])
            for k, v in out.items():
                if k == "total_loss" or k.startswith("loss/"):
                    sums[k] = sums.get(k, 0.0) + float(v.detach().float())
        terms = {k: v / self.split.accumulation for k, v in sums.items()}
        keys = sorted(terms)
        skipped = float(self.loader.skipped)  # bad samples/shards this rank's loader passed over
        # A stop request on any rank (signal, stop file, launcher gone) rides on this all-reduce: all ranks stop
        # at the same iteration. The stop file is a shared-filesystem stat: rank 0 alone reads it.
        stop = float(self.stop.requested(check_file=self.rank == 0))
        vec = torch.tensor([terms[k] for k in keys] + [data_wait, skipped, clips, stop], dtype=torch.float64,
                           device=self.device)
        self.dist.all_reduce(vec)
        vals = vec.tolist()
        n = len(keys)
        terms = {k: vals[i] / self.world for i, k in enumerate(keys)}
        terms["data_skipped"] = int(vals[n + 1])  # summed over ranks
        terms["clips"] = int(vals[n + 2])  # clips in this optimizer step over all ranks (= the global batch)
        terms["stop"] = vals[n + 3]
        terms["level"] = self.loader.level_at(self.loader.iteration - 1)  # curriculum level of this step's data
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
                   for k, v in terms.items() if k not in ("clips", "data_skipped", "level", "stop")}
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
                        "mlflow_run_id": self.run_id, "config_hash": self.cfg.hash(), "config": self.cfg.to_dict(),
                        "nonfinite_in_a_row": self.nonfinite_in_a_row}
        return checkpoint.save(self.engine, self.ckpt_dir, self.iteration, client_state, self.cfg.checkpoint.keep_last)

    def _validate(self) -> None:
        """Collective: rank 0 consolidates the checkpoint's weights, every rank scores its share of the val
        sequences on its own device, rank 0 reduces and logs (training/validation.py). A validation past
        validation.time_limit_minutes is recorded as skipped and the job goes on."""
        from training import checkpoint
        from training.validation import validate_checkpoint

        ref = checkpoint.latest_complete(self.ckpt_dir)
        if ref is None or ref.iteration != self.iteration:
            ref = self._save()
        validate_checkpoint(self.cfg, self.model_cfg, ref, self.tracker, device=self.device)
        if self.rank == 0:  # validated or skipped: recorded, never owed again (read by _owes_validation)
            with open(self.out / "validated.txt", "a") as f:
                f.write(ref.tag + "\n")
            # Rotate the consolidated weights; a queued logged-model upload holds its own hard links of them.
            checkpoint.purge_weights(self.out / "weights", self.cfg.checkpoint.keep_weights)
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
