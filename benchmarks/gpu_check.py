"""One GPU check: the training and inference numbers of S3 and Cutie-base on one GPU, in one run (< 8 min on one H200).

    benchmarks/gpu_check.sh [--json bench_out/gpu_check.json]     # full run, needs CUDA
    benchmarks/gpu_check.sh --smoke --json /tmp/x.json             # CPU, tiny sizes (frames 96x160: rf-cutie needs >= top_k 30 memory tokens): every code path (tests run it)

Sections (each has a time budget; the timed loops stop early at it, and the counts that ran are reported):

1. Training step, for `s3` and `cutie_base`: ClipTrainer forward + backward + grad-norm clip + torch AdamW step at the
   paper's per-GPU batch (16 clips global / 8 GPUs = 2 clips of 8 frames, crop 480, 3 objects), bf16 autocast with
   fp32 parameters, random weights (no checkpoint files). Seconds per iteration (mean of the timed iterations after
   the warm-up), clips/s, and peak memory (torch.cuda.max_memory_allocated over the timed iterations).
2. Deformable attention share (S3): the share of the training step's time spent in the
   model.encoders.deformable.MultiScaleDeformableAttention modules (torch.profiler: the device time of the kernels
   launched by ops inside those modules' forward, plus the backward nodes those ops created, over the device time of
   all kernels of the step), and of memory (the bytes autograd saves for backward inside those modules, over all
   saved bytes and over the step's peak memory).
3. Inference FPS at 480p (480x854 frames, 2 objects, our InferenceCore with the d17-val settings, random weights) for
   our `s3` and `cutie_base` and rf-cutie's own Cutie-base + InferenceCore, with and without flip, fp32 (as Cutie and
   S3 evaluate) and bf16 autocast.
4. Projection: the 190k-iteration schedule on 8 GPUs from the measured seconds per iteration (per-GPU batch 2, one
   optimizer step per iteration, no accumulation), ideal data-parallel scaling, and with a non-overlapped ring
   all-reduce of the fp32 gradients at an assumed bus bandwidth (--allreduce-gbps) added to every iteration.

Prints a table and writes JSON (--json). In --smoke mode everything runs on the CPU at toy sizes (the `tiny` config
stands in for `s3`), so the numbers mean nothing; the run only proves that the script works.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's packages, benchmarks.bench_eval / bench_model (imported where used)

warnings.filterwarnings("ignore", category=FutureWarning)  # rf-cutie's torch.cuda.amp calls

# the paper's training setting
GLOBAL_BATCH, GPUS, ITERATIONS = 16, 8, 190_000
PER_GPU_BATCH = GLOBAL_BATCH // GPUS
LR, WEIGHT_DECAY, ENCODER_LR_RATIO, CLIP_GRAD_NORM = 5e-5, 0.05, 0.1, 3.0  # training/configs/s3_mega.yaml
# random weights for every key that names a pretrained file (the configs may point at files this machine lacks)
RANDOM_INIT = {"pixel_encoder": {"init": "random", "weights": None}, "mask_encoder": {"weights": None}}
DEFORM_LABEL = "s3::deformable_attention"
GIB = 2**30


@dataclass
class Settings:
    mode: str
    device: str
    networks: dict[str, str]  # label -> model config name
    crop: int
    frames: int
    objects: int
    batch: int
    warmup: int
    iters: int
    profile_iters: int
    train_budget_s: float  # per network, timed loop
    fps_frames: int  # including the annotated first frame, which is not timed
    fps_hw: tuple[int, int]
    fps_budget_s: float  # per case
    precisions: tuple[str, ...]
    flips: tuple[bool, ...] = (False, True)
    rf_cutie: bool = True
    bf16_train: bool = True
    iterations: int = ITERATIONS
    gpus: int = GPUS
    allreduce_gbps: float = 100.0
    extra: dict = field(default_factory=dict)


def settings(args: argparse.Namespace) -> Settings:
    if args.smoke:
        s = Settings(mode="smoke", device=args.device or "cpu", networks={"s3": "tiny", "cutie_base": "cutie_base"},
                     crop=64, frames=3, objects=2, batch=PER_GPU_BATCH, warmup=1, iters=1, profile_iters=1,
                     train_budget_s=30, fps_frames=4, fps_hw=(96, 160), fps_budget_s=10, precisions=("fp32",))
    else:
        s = Settings(mode="full", device=args.device or "cuda", networks={"s3": "s3", "cutie_base": "cutie_base"},
                     crop=480, frames=8, objects=3, batch=PER_GPU_BATCH, warmup=3, iters=10, profile_iters=2,
                     train_budget_s=60, fps_frames=41, fps_hw=(480, 854), fps_budget_s=12,
                     precisions=("fp32", "bf16"))
    for k in ("warmup", "iters", "fps_frames", "iterations", "gpus", "allreduce_gbps"):
        if getattr(args, k) is not None:
            setattr(s, k, getattr(args, k))
    return s


# ------------------------------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, source). On CPU: the process's peak resident set (all sections so far), a placeholder."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "torch.cuda.max_memory_allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20, "process peak RSS (CPU; not the step's own memory)"


def build_trainer(cfg_name: str, s: Settings, device: torch.device):
    from model import build_network, load_model_config, param_groups
    from model.train_wrapper import ClipTrainer

    torch.manual_seed(0)
    cfg = load_model_config(cfg_name, {**RANDOM_INIT, "num_frames": s.frames, "num_objects": s.objects})
    trainer = ClipTrainer(build_network(cfg), cfg).to(device).train()
    groups = [g for g in param_groups(trainer.network, LR, WEIGHT_DECAY, ENCODER_LR_RATIO) if list(g["params"])]
    for g in groups:
        g["params"] = list(g["params"])
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), weight_decay=WEIGHT_DECAY)
    params = [p for g in groups for p in g["params"]]
    return trainer, optimizer, params


def make_step(trainer, optimizer, params, batch, device: torch.device, bf16: bool):
    """(step, forward_backward): one training iteration (forward, backward, grad-norm clip, AdamW step), and the
    same without the optimizer (for counting what autograd saves)."""

    def forward_backward() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = trainer(batch)
        out["total_loss"].backward()

    def step() -> None:
        forward_backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, forward_backward


# ------------------------------------------------------------------------------------------- deformable share
def deformable_modules(trainer) -> list[torch.nn.Module]:
    from model.encoders.deformable import MultiScaleDeformableAttention

    return [m for m in trainer.modules() if isinstance(m, MultiScaleDeformableAttention)]


@contextlib.contextmanager
def labelled(modules: list[torch.nn.Module], label: str = DEFORM_LABEL):
    """A profiler range named `label` around every forward of `modules`."""
    stack: list = []

    def pre(_m, _a):
        rf = torch.profiler.record_function(label)
        rf.__enter__()
        stack.append(rf)

    def post(_m, _a, _o):
        stack.pop().__exit__(None, None, None)

    handles = [h for m in modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def time_share(events, on_device: bool, label: str = DEFORM_LABEL) -> dict:
    """Share of the profiled time in the `label` ranges: the ops inside them (forward) and the autograd nodes those
    ops created (backward, matched by forward sequence number and thread). Device time of the kernels on CUDA,
    CPU time on CPU."""
    from torch.autograd import DeviceType

    cpu_events = [e for e in events if e.device_type == DeviceType.CPU]  # GPU-side annotations would double count

    def self_t(e) -> float:
        return e.self_device_time_total if on_device else e.self_cpu_time_total

    def incl_t(e) -> float:
        return e.device_time_total if on_device else e.cpu_time_total

    total = sum(self_t(e) for e in cpu_events)
    fwd, keys, ranges = 0.0, set(), 0
    for e in cpu_events:
        if e.name != label:
            continue
        ranges += 1
        todo = [e]
        while todo:
            x = todo.pop()
            fwd += self_t(x)
            if x.sequence_nr >= 0:
                keys.add((x.sequence_nr, x.thread))
            todo.extend(x.cpu_children)
    backward = [e for e in cpu_events if e.name.startswith("autograd::engine::evaluate_function")]
    matched = [e for e in backward if (e.sequence_nr, e.fwd_thread) in keys]
    match = "sequence number + forward thread"
    if keys and not matched:  # a profiler that does not fill fwd_thread: the forward runs on one thread anyway
        seqs = {k[0] for k in keys}
        matched, match = [e for e in backward if e.sequence_nr in seqs], "sequence number"
    bwd = sum(incl_t(e) for e in matched)
    return {"share": (fwd + bwd) / total if total > 0 else float("nan"), "forward_s": fwd / 1e6,
            "backward_s": bwd / 1e6, "total_s": total / 1e6, "ranges": ranges,
            "backward_nodes": len(matched), "backward_match": match,
            "time_source": "CUDA kernel time (torch.profiler)" if on_device else "CPU op time (torch.profiler)"}


class SavedBytes:
    """Bytes that autograd saves for backward (distinct storages, parameters excluded), inside / outside `modules`."""

    def __init__(self, modules: list[torch.nn.Module], params) -> None:
        self.modules = modules
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in params}
        self.depth = 0
        self.seen: dict[int, tuple[int, bool]] = {}

    def _pack(self, t: torch.Tensor):
        with contextlib.suppress(Exception):  # a tensor without storage (e.g. sparse/meta) is not counted
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if nbytes and ptr not in self.param_ptrs and ptr not in self.seen:
                self.seen[ptr] = (nbytes, self.depth > 0)
        return t

    @contextlib.contextmanager
    def __call__(self):
        def pre(_m, _a):
            self.depth += 1

        def post(_m, _a, _o):
            self.depth -= 1

        handles = [h for m in self.modules for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in handles:
                h.remove()

    def totals(self) -> tuple[int, int]:
        inside = sum(n for n, i in self.seen.values() if i)
        return inside, sum(n for n, _ in self.seen.values())


def deformable_share(trainer, step_fns, device: torch.device, s: Settings, peak_gib: float) -> dict:
    from torch.profiler import ProfilerActivity, profile

    modules = deformable_modules(trainer)
    if not modules:
        raise RuntimeError("the network has no MultiScaleDeformableAttention module")
    step, forward_backward = step_fns
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with labelled(modules), profile(activities=activities) as prof:
        for _ in range(s.profile_iters):
            step()
        sync(device)
    t0 = time.perf_counter()
    res = time_share(prof.events(), device.type == "cuda")
    res["profile_postprocess_s"] = time.perf_counter() - t0
    res["profiled_iters"] = s.profile_iters
    res["modules"] = len(modules)
    res["ranges"] //= max(1, s.profile_iters)
    counter = SavedBytes(modules, trainer.parameters())
    with counter():
        forward_backward()
    inside, total = counter.totals()
    res.update(saved_bytes_deformable=inside, saved_bytes_all=total,
               activation_share=inside / total if total else float("nan"),
               peak_share=(inside / GIB) / peak_gib if peak_gib > 0 else float("nan"))
    return res


# --------------------------------------------------------------------------------------------------- training
def train_section(label: str, s: Settings, device: torch.device, with_deformable: bool) -> dict:
    from benchmarks.bench_model import synthetic_batch

    cfg_name = s.networks[label]
    fresh_memory(device)
    t_build = time.perf_counter()
    trainer, optimizer, params = build_trainer(cfg_name, s, device)
    batch = synthetic_batch(s.batch, s.frames, s.crop, s.objects, device)
    build_s = time.perf_counter() - t_build
    step, forward_backward = make_step(trainer, optimizer, params, batch, device, s.bf16_train)

    t0 = time.perf_counter()
    for _ in range(s.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # steady state: weights, grads and AdamW states already exist
    times: list[float] = []
    t_loop = time.perf_counter()
    while len(times) < s.iters:
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
        if time.perf_counter() - t_loop > s.train_budget_s and len(times) >= 2:
            break
    peak_gib, peak_src = peak_memory(device)
    s_per_it = float(np.mean(times))
    res = {"config": cfg_name, "per_gpu_batch": s.batch, "frames": s.frames, "crop": s.crop, "objects": s.objects,
           "precision": "bf16 autocast, fp32 parameters" if s.bf16_train else "fp32",
           "warmup_iters": s.warmup, "timed_iters": len(times), "s_per_it": s_per_it,
           "s_per_it_median": float(np.median(times)), "s_per_it_min": float(np.min(times)),
           "clips_per_s": s.batch / s_per_it, "peak_memory_gib": peak_gib, "peak_memory_source": peak_src,
           "params_m": sum(p.numel() for p in trainer.parameters()) / 1e6,
           "trainable_params_m": sum(p.numel() for p in params) / 1e6,
           "grad_bytes_fp32": 4 * sum(p.numel() for p in params), "build_s": build_s, "warmup_s": warmup_s}
    if device.type == "cuda":
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    if with_deformable:
        res["deformable"] = deformable_share(trainer, (step, forward_backward), device, s, peak_gib)
        optimizer.zero_grad(set_to_none=True)
    return res  # the caller frees the memory (fresh_memory) once this frame's tensors are gone


# -------------------------------------------------------------------------------------------------- inference
def make_video(n: int, h: int, w: int, seed: int = 0) -> tuple[list[torch.Tensor], np.ndarray]:
    """n random frames (3, h, w) in [0, 1] and a first-frame mask with two rectangles (sizes relative to the frame)."""
    rng = np.random.default_rng(seed)
    imgs = [torch.from_numpy(rng.random((3, h, w), dtype=np.float32)) for _ in range(n)]
    mask = np.zeros((h, w), np.int64)
    mask[h // 5:h // 2, w // 4:w // 2] = 1
    mask[h // 2 + 2:5 * h // 6, w // 2 + 2:5 * w // 6] = 2
    return imgs, mask


def _case_name(precision: str, flip: bool) -> str:
    return f"{precision}_{'flip' if flip else 'noflip'}"


def _timed_fps(step, imgs, mask, device: torch.device, budget_s: float) -> tuple[float, int, float]:
    """(FPS, frames timed, peak GiB). A 3-frame probe run first (warm-up: cuDNN autotuning, allocator) sizes the
    timed run to the budget."""
    from benchmarks.bench_eval import _run

    fresh_memory(device)
    probe = imgs[:min(len(imgs), 3)]
    fps = _run(step, probe, mask, device)
    n = len(imgs)
    if len(imgs) > len(probe):
        n = max(len(probe), min(len(imgs), int(budget_s * fps)))
        fresh_memory(device)
        fps = _run(step, imgs[:n], mask, device)
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return fps, n - 1, peak


def fps_section(s: Settings, device: torch.device, log) -> dict:
    import model
    from benchmarks.bench_eval import rf_cutie_base
    from model.config import load_model_config
    from model.inference import InferenceConfig, InferenceCore

    imgs, mask = make_video(s.fps_frames, *s.fps_hw)
    out: dict = {}
    for label in ("s3", "cutie_base"):
        torch.manual_seed(0)
        net = model.build_network(load_model_config(s.networks[label], RANDOM_INIT)).to(device).eval()
        out[label] = {"config": s.networks[label]}
        for precision in s.precisions:
            for flip in s.flips:
                core = InferenceCore(net, InferenceConfig(size=480, flip=flip, amp=precision == "bf16"))
                fps, n, peak = _timed_fps(lambda im, m, c=core: c.step(im, m), imgs, mask, device, s.fps_budget_s)
                out[label][_case_name(precision, flip)] = {"fps": fps, "frames": n, "peak_memory_gib": peak}
                log(f"  fps {label:<13} {_case_name(precision, flip):<13} {fps:8.2f} FPS ({n} frames)")
        del net
        fresh_memory(device)
    if not s.rf_cutie:
        out["rf_cutie_base"] = {"skipped": f"skipped in {s.mode}"}
        log(f"  fps rf-cutie: skipped in {s.mode}")
        return out
    from cutie.inference.inference_core import InferenceCore as CutieCore

    torch.manual_seed(0)
    net, cfg = rf_cutie_base()
    net = net.to(device)
    out["rf_cutie_base"] = {"config": "rf-cutie model/base.yaml, eval_config.yaml, mem_every 5, no long-term"}
    for precision in s.precisions:
        for flip in s.flips:
            cfg.flip_aug = flip
            cfg.mem_every, cfg.use_long_term = 5, False  # the d17-val settings (the top-level keys are null)
            core = CutieCore(net, cfg)
            amp = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" and device.type == "cuda"
                   else contextlib.nullcontext())

            def step(im, m, core=core, amp=amp):
                with torch.inference_mode(), amp:
                    mm = torch.from_numpy(m).to(device) if m is not None else None
                    return core.step(im, mm, [1, 2] if m is not None else None)

            fps, n, peak = _timed_fps(step, imgs, mask, device, s.fps_budget_s)
            out["rf_cutie_base"][_case_name(precision, flip)] = {"fps": fps, "frames": n, "peak_memory_gib": peak}
            log(f"  fps {'rf_cutie_base':<13} {_case_name(precision, flip):<13} {fps:8.2f} FPS ({n} frames)")
    del net
    fresh_memory(device)
    return out


# ------------------------------------------------------------------------------------------------- projection
def projection(train: dict, s: Settings) -> dict:
    factor = 2 * (s.gpus - 1) / s.gpus  # ring all-reduce: each GPU sends and receives 2(n-1)/n of the buffer
    res = {"iterations": s.iterations, "gpus": s.gpus, "global_batch": s.batch * s.gpus, "per_gpu_batch": s.batch,
           "accumulation": 1, "allreduce_bus_gbps": s.allreduce_gbps,
           "assumption": (f"{s.iterations} iterations x measured s/it at per-GPU batch {s.batch} ({s.gpus} GPUs, "
                          f"global batch {s.batch * s.gpus}, one optimizer step per iteration, no accumulation); "
                          "'ideal' = perfect data-parallel scaling, data loading fully hidden; '+allreduce' adds a "
                          f"non-overlapped ring all-reduce of the fp32 gradients at {s.allreduce_gbps:g} GB/s bus "
                          "bandwidth every iteration (an upper bound: DDP/ZeRO overlap it with the backward); "
                          "validation and checkpoint time not included")}
    for label, r in train.items():
        allreduce_s = factor * r["grad_bytes_fp32"] / (s.allreduce_gbps * 1e9)
        res[label] = {"s_per_it": r["s_per_it"], "allreduce_s_per_it": allreduce_s,
                      "hours_ideal": s.iterations * r["s_per_it"] / 3600,
                      "hours_with_allreduce": s.iterations * (r["s_per_it"] + allreduce_s) / 3600,
                      "global_clips_per_s_ideal": r["clips_per_s"] * s.gpus}
    return res


# ------------------------------------------------------------------------------------------------------ report
def table(report: dict) -> str:
    lines = [f"== gpu_check ({report['mode']}) on {report['device_name']} | torch {report['torch']} | "
             f"wall {report['wall_s']:.0f} s"]
    tr = report.get("train", {})
    if tr:
        lines.append("-- training step (per GPU) --")
        lines.append(f"{'network':<12}{'config':<12}{'batch':>6}{'s/it':>10}{'clips/s':>10}{'peak GiB':>10}"
                     f"{'timed':>7}  precision")
        for label, r in tr.items():
            lines.append(f"{label:<12}{r['config']:<12}{r['per_gpu_batch']:>6}{r['s_per_it']:>10.3f}"
                         f"{r['clips_per_s']:>10.2f}{r['peak_memory_gib']:>10.2f}{r['timed_iters']:>7}  "
                         f"{r['precision']}")
        lines.append(f"  ({r['frames']} frames, crop {r['crop']}, {r['objects']} objects; peak = "
                     f"{r['peak_memory_source']})")
        if "s3" in tr and "cutie_base" in tr:
            a, b = tr["s3"], tr["cutie_base"]
            lines.append(f"  S3 / Cutie-base: time {a['s_per_it'] / b['s_per_it']:.2f}x, "
                         f"memory {a['peak_memory_gib'] / b['peak_memory_gib']:.2f}x")
    d = report.get("deformable")
    if d:
        lines.append("-- deformable attention in the S3 training step --")
        lines.append(f"  time share {100 * d['share']:.1f}% (forward {d['forward_s']:.4f} s + backward "
                     f"{d['backward_s']:.4f} s of {d['total_s']:.4f} s, {d['profiled_iters']} profiled iterations, "
                     f"{d['modules']} modules; {d['time_source']})")
        lines.append(f"  memory: saved for backward {d['saved_bytes_deformable'] / GIB:.3f} GiB of "
                     f"{d['saved_bytes_all'] / GIB:.3f} GiB activations ({100 * d['activation_share']:.1f}%), "
                     f"{100 * d['peak_share']:.1f}% of the step's peak")
    fps = report.get("fps")
    if fps:
        cases = [c for c in fps["s3"] if c != "config"]
        lines.append(f"-- inference FPS at {report['settings']['fps_hw'][0]}x{report['settings']['fps_hw'][1]} "
                     "(random weights, 2 objects, d17-val settings) --")
        lines.append(f"{'network':<16}" + "".join(f"{c:>15}" for c in cases))
        for label, r in fps.items():
            if "skipped" in r:
                lines.append(f"{label:<16}{r['skipped']}")
                continue
            lines.append(f"{label:<16}" + "".join(f"{r[c]['fps']:>15.2f}" for c in cases))
    p = report.get("projection")
    if p:
        lines.append(f"-- projection: {p['iterations']} iterations on {p['gpus']} GPUs (global batch "
                     f"{p['global_batch']}) --")
        for label in ("s3", "cutie_base"):
            if label in p:
                q = p[label]
                lines.append(f"  {label:<12} {q['hours_ideal']:8.1f} h ideal | {q['hours_with_allreduce']:8.1f} h "
                             f"+allreduce ({1000 * q['allreduce_s_per_it']:.1f} ms/it)")
        lines.append(f"  assumption: {p['assumption']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: exercises every code path")
    p.add_argument("--json", default="bench_out/gpu_check.json")
    p.add_argument("--device", help="default: cuda (full), cpu (smoke)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--fps-frames", type=int)
    p.add_argument("--iterations", type=int, help=f"schedule length to project (default {ITERATIONS})")
    p.add_argument("--gpus", type=int, help=f"GPUs to project onto (default {GPUS})")
    p.add_argument("--allreduce-gbps", type=float, help="assumed all-reduce bus bandwidth, GB/s (default 100)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-fps", action="store_true")
    p.add_argument("--no-rf-cutie", action="store_true")
    args = p.parse_args(argv)
    s = settings(args)
    s.rf_cutie = s.rf_cutie and not args.no_rf_cutie
    device = torch.device(s.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("gpu_check: CUDA is not available (use --smoke for the CPU check)", file=sys.stderr)
            return 2
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed shapes throughout, as Cutie's training sets it
    elif s.mode == "smoke":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    report: dict = {
        "mode": s.mode, "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "settings": dataclasses.asdict(s),
        "backends": {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                     "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "threads": torch.get_num_threads()},
    }
    if not args.skip_train:
        report["train"] = {}
        for label in ("s3", "cutie_base"):
            log(f"training step: {label} ({s.networks[label]})")
            r = train_section(label, s, device, with_deformable=label == "s3")
            fresh_memory(device)
            if "deformable" in r:
                report["deformable"] = r.pop("deformable")
            report["train"][label] = r
            log(f"  {label}: {r['s_per_it']:.3f} s/it, {r['clips_per_s']:.2f} clips/s, "
                f"peak {r['peak_memory_gib']:.2f} GiB")
        report["projection"] = projection(report["train"], s)
    if not args.skip_fps:
        log("inference FPS")
        report["fps"] = fps_section(s, device, log)
    report["wall_s"] = time.perf_counter() - t_start
    print(table(report), flush=True)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    print(f"wrote {out}")
    return 0


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
