"""The reference's numerics: SyncBatchNorm over ranks, ImageNet init of the ResNets, fp32 islands under bf16
autocast, autocast over fp32 parameters for training, and `model.init_from`."""

from __future__ import annotations

import socket
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

# ------------------------------------------------------------------------------------------------ SyncBatchNorm
C = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync_bn_worker(rank: int, port: int, out_dir: str, x_full, g_full, weight, bias) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from model.sync_batchnorm import SyncBatchNorm2d, sync_batchnorm

        bn = nn.BatchNorm2d(C, momentum=0.3)
        with torch.no_grad():
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
        net = nn.Sequential(nn.Identity(), bn)
        assert sync_batchnorm(net) == 1 and type(net[1]) is SyncBatchNorm2d and net[1] is bn
        half = x_full.shape[0] // 2
        results = {}
        for step in range(2):  # two steps: the running statistics' momentum update twice
            x = x_full[rank * half:(rank + 1) * half].clone().requires_grad_(True)
            bn.zero_grad()
            y = net(x)
            (y * g_full[rank * half:(rank + 1) * half]).sum().backward()
            results[step] = {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(), "db": bn.bias.grad.clone()}
        results["running_mean"], results["running_var"] = bn.running_mean.clone(), bn.running_var.clone()
        results["num_batches_tracked"] = bn.num_batches_tracked.clone()
        bn.eval()
        results["eval"] = net(x_full).detach()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_sync_batchnorm_on_two_gloo_ranks_equals_full_batch_batchnorm(tmp_path):
    g = torch.Generator().manual_seed(0)
    x_full = torch.randn(4, C, 5, 7, generator=g) * 3 + torch.arange(C).view(1, C, 1, 1) * 2.0  # non-zero means
    g_full = torch.randn(4, C, 5, 7, generator=g)
    weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    mp.spawn(_sync_bn_worker, args=(_free_port(), str(tmp_path), x_full, g_full, weight, bias), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    ref = nn.BatchNorm2d(C, momentum=0.3)
    with torch.no_grad():
        ref.weight.copy_(weight)
        ref.bias.copy_(bias)
    for step in range(2):
        x = x_full.clone().requires_grad_(True)
        ref.zero_grad()
        y = ref(x)
        (y * g_full).sum().backward()
        got = [r[step] for r in ranks]
        torch.testing.assert_close(torch.cat([r["y"] for r in got]), y.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.cat([r["dx"] for r in got]), x.grad, atol=1e-5, rtol=1e-5)
        # weight/bias gradients are each rank's part; the data-parallel engine combines them
        torch.testing.assert_close(got[0]["dw"] + got[1]["dw"], ref.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[0]["db"] + got[1]["db"], ref.bias.grad, atol=1e-5, rtol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], ref.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["running_var"], ref.running_var, atol=1e-5, rtol=1e-5)
        assert int(r["num_batches_tracked"]) == 2
    for key in ("running_mean", "running_var"):  # identical on every rank, bit for bit
        assert torch.equal(ranks[0][key], ranks[1][key])
    ref.eval()
    torch.testing.assert_close(ranks[0]["eval"], ref(x_full).detach(), atol=1e-5, rtol=1e-5)


def test_sync_batchnorm_converts_only_the_batchnorms_in_training_use():
    from model import build_network, load_model_config, sync_batchnorm
    from model.summary import RANDOM_ENCODER
    from model.sync_batchnorm import SyncBatchNorm2d, batchnorms_in_training_use, plain_batchnorm

    torch.manual_seed(0)
    net = build_network(load_model_config("tiny")).eval()
    keys_before = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    x = torch.rand(2, 3, 64, 64)
    net.train()
    torch.manual_seed(1)  # drop path
    plain = [f.detach() for f in net.encode_image(x)[0]]
    net.eval()
    trained = set(batchnorms_in_training_use(net))
    assert trained and all(n.startswith("pixel_encoder.") for n in trained)  # SPM and output norms (S3: trainable)
    assert not net.training  # modes are restored
    assert sync_batchnorm(net) == len(trained)
    assert not net.training and not any(m.training for m in net.modules())
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == keys_before  # checkpoints interchangeable
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (type(m) is SyncBatchNorm2d) == (name in trained), name
    net.train()
    assert all(not m.training for m in net.mask_encoder.modules() if isinstance(m, nn.BatchNorm2d))  # still frozen
    assert all(m.training for m in net.modules() if isinstance(m, SyncBatchNorm2d))
    # no process group: plain BatchNorm behaviour
    torch.manual_seed(1)
    for a, b in zip(net.encode_image(x)[0], plain, strict=True):
        torch.testing.assert_close(a.detach(), b)
    assert sync_batchnorm(net) == 0  # idempotent
    assert plain_batchnorm(net) == len(trained)
    # Cutie-base keeps every BatchNorm frozen (ResNet-50 pixel encoder and ResNet-18 mask encoder)
    cutie = build_network(load_model_config("cutie_base", RANDOM_ENCODER))
    assert sync_batchnorm(cutie) == 0


# ------------------------------------------------------------------------------------------------ ImageNet init
def test_paper_configs_name_the_imagenet_resnet18():
    from model.config import load_model_config

    for name in ("s3", "cutie_base", "cutie_dq", "cutie_dq_vit", "cutie_dq_vit_spatial"):
        assert load_model_config(name).mask_encoder.weights == "pretrained/resnet18.pth", name
    assert load_model_config("tiny").mask_encoder.weights is None


def test_imagenet_resnet18_file_initialises_the_mask_encoder(tmp_path):
    import timm

    from model import build_network, load_model_config

    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # timm = torchvision names, with layer4 and fc
    net = build_network(load_model_config("tiny", {"mask_encoder": {"weights": str(path)}}))
    assert torch.equal(net.mask_encoder.conv1.weight[:, :3], reference.conv1.weight)
    assert net.mask_encoder.conv1.weight.shape[1] == 5
    assert torch.equal(net.mask_encoder.layer2[0].downsample[1].running_var, reference.layer2[0].downsample[1].running_var)


def test_missing_pretrained_files_name_the_config_key(tmp_path):
    from model import build_network, load_model_config

    absent = tmp_path / "resnet18.pth"
    with pytest.raises(FileNotFoundError, match=r"mask_encoder\.weights: .*resnet18\.pth not found.*"
                                                r"mask_encoder\.weights=null"):
        build_network(load_model_config("tiny", {"mask_encoder": {"weights": str(absent)}}))
    vit = tmp_path / "depth_anything_vitb14.pth"
    with pytest.raises(FileNotFoundError, match=r"pixel_encoder\.weights: .*depth_anything_vitb14\.pth not found"):
        build_network(load_model_config("tiny", {"pixel_encoder": {"init": "file", "weights": str(vit)}}))
    with pytest.raises(FileNotFoundError, match=r"pixel_encoder\.weights: .*resnet50\.pth not found.*resnet50"):
        build_network(load_model_config("cutie_base", {"pixel_encoder": {"weights": str(tmp_path / "resnet50.pth")},
                                                       "mask_encoder": {"weights": None}}))


# ------------------------------------------------------------------------------------------------ fp32 islands
def _deformable_case():
    from model.encoders.deformable import MultiScaleDeformableAttention, grid_reference_points

    torch.manual_seed(0)
    gh = gw = 16
    attn = MultiScaleDeformableAttention(96, heads=3, levels=1, points=4)
    with torch.no_grad():  # a "trained" state: query-dependent offsets of a few cells and non-uniform weights
        attn.sampling_offsets.weight.normal_(0, 0.05)
        attn.attention_weights.weight.normal_(0, 0.05)
    queries = 4 * gh * gw + gh * gw
    query = torch.nn.functional.layer_norm(torch.randn(2, queries, 96), (96,))
    value = torch.randn(2, gh * gw, 96)
    ref_points = grid_reference_points([(2 * gh, 2 * gw), (gh, gw)], levels=1, device=torch.device("cpu"))
    return attn, query, ref_points, value, [(gh, gw)]


def test_deformable_sampling_stays_fp32_under_bf16_autocast():
    attn, query, ref_points, value, shapes = _deformable_case()
    with torch.no_grad():
        reference = attn(query, ref_points, value, shapes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            island = attn(query, ref_points, value, shapes)
            attn.fp32_sampling = False
            bf16_grid = attn(query, ref_points, value, shapes)
    err_island = (island.float() - reference).abs().max().item()
    err_bf16 = (bf16_grid.float() - reference).abs().max().item()
    assert err_island < 0.05, err_island
    assert err_bf16 > 4 * err_island, (err_bf16, err_island)
    # bf16 weights (DeepSpeed-style) too: the sampling runs on fp32 copies, the output comes back in bf16
    attn.fp32_sampling = True
    attn.to(torch.bfloat16)
    with torch.no_grad():
        out = attn(query.bfloat16(), ref_points, value.bfloat16(), shapes)
    assert out.dtype == torch.bfloat16


def test_key_projection_outputs_fp32_under_autocast_and_bf16_weights():
    from model.modules.key_projection import KeyProjection

    torch.manual_seed(0)
    proj = KeyProjection(48, 32, 16)
    f16 = torch.randn(2, 48, 8, 8)
    with torch.no_grad():
        ref = proj(f16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = proj(f16)
        for a, b in zip(got, ref, strict=True):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b)
        proj.to(torch.bfloat16)
        assert all(t.dtype == torch.float32 for t in proj(f16.bfloat16()))


# ------------------------------------------------------------------------------------------------ autocast training
def test_clip_trainer_under_forward_context_bf16_keeps_fp32_params_and_grads():
    from model import build_network, load_model_config
    from model.train_wrapper import ClipTrainer
    from tests.model.helpers import make_batch
    from training.optim import autocast_dtype, forward_context, input_dtype

    cfg_bf16 = types.SimpleNamespace(train=types.SimpleNamespace(precision="bf16"))
    cfg_fp32 = types.SimpleNamespace(train=types.SimpleNamespace(precision="fp32"))
    assert autocast_dtype(cfg_bf16) is torch.bfloat16 and autocast_dtype(cfg_fp32) is None
    assert input_dtype(cfg_bf16) is torch.float32
    torch.manual_seed(0)
    cfg = load_model_config("tiny", {"num_frames": 3, "drop_path": 0.0, "loss": {"importance_sample_ratio": 0.0}})
    trainer = ClipTrainer(build_network(cfg), cfg).train()
    state = {k: v.clone() for k, v in trainer.state_dict().items()}
    batch = make_batch(b=2, t=3, h=64, w=64)
    losses, grads = {}, {}
    for name, tcfg in (("fp32", cfg_fp32), ("bf16", cfg_bf16)):
        trainer.load_state_dict(state)
        trainer.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with forward_context(tcfg, torch.device("cpu")):
            out = trainer({k: v.to(input_dtype(tcfg)) if v.is_floating_point() else v
                           for k, v in batch.items() if k != "info"})
        assert out["total_loss"].dtype == torch.float32
        out["total_loss"].backward()
        losses[name] = float(out["total_loss"].detach())
        grads[name] = {n: p.grad.clone() for n, p in trainer.named_parameters() if p.grad is not None}
    assert torch.isfinite(torch.tensor(losses["bf16"]))
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * abs(losses["fp32"]), losses
    assert grads["bf16"].keys() == grads["fp32"].keys() and grads["fp32"]
    assert all(p.dtype == torch.float32 for p in trainer.parameters())
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads["bf16"].values())
    num = sum(float((grads["bf16"][k] - grads["fp32"][k]).square().sum()) for k in grads["fp32"])
    den = sum(float(grads["fp32"][k].square().sum()) for k in grads["fp32"])
    assert (num / den) ** 0.5 < 0.1


# ------------------------------------------------------------------------------------------------ init_from
def _tiny(overrides=None, seed=0):
    from model import build_network, load_model_config

    torch.manual_seed(seed)
    return build_network(load_model_config("tiny", overrides))


def test_init_from_loads_our_and_the_release_layout_exactly(tmp_path):
    from model import format_init_report, init_from_checkpoint
    from model.convert import from_ours

    source = _tiny(seed=0)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = source.state_dict()
    ours = tmp_path / "ours.pt"
    torch.save({"weights": state}, ours)
    target = _tiny(seed=1)
    report = init_from_checkpoint(target, ours)
    assert report["layout"] == "ours" and not report["missing"] and not report["skipped_shape"]
    assert sorted(report["loaded"]) == sorted(state) and not report["unused"]
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k
    text = format_init_report(report)
    assert "pixel_encoder" in text and "object_transformer" in text and str(ours) in text

    release, _ = from_ours(state, "s3-release", state)
    rel_path = tmp_path / "release.pth"
    torch.save(release, rel_path)
    target = _tiny(seed=2)
    report = init_from_checkpoint(target, rel_path)
    assert report["layout"] == "s3-release" and not report["missing"]
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_init_from_reports_shape_mismatches_and_refuses_bad_files(tmp_path):
    from model import format_init_report, init_from_checkpoint

    source = _tiny(seed=0)
    path = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), path)
    bigger = _tiny({"object_transformer": {"ff_dim": 128, "num_blocks": 3}}, seed=3)
    before = {k: v.clone() for k, v in bigger.state_dict().items()}
    report = init_from_checkpoint(bigger, path)
    assert report["skipped_shape"] and all(k.startswith("object_transformer.") for k, _, _ in report["skipped_shape"])
    assert any(k.startswith("object_transformer.blocks.2.") for k in report["missing"])
    now = bigger.state_dict()
    for k, file_shape, net_shape in report["skipped_shape"]:
        assert tuple(file_shape) != tuple(net_shape) and torch.equal(now[k], before[k])  # kept its own init
    for k in report["loaded"]:
        assert torch.equal(now[k], source.state_dict()[k])
    text = format_init_report(report)
    assert "object_transformer" in text and "shape" in text and "mask_encoder" in text

    with pytest.raises(FileNotFoundError, match="absent.pt"):
        init_from_checkpoint(bigger, tmp_path / "absent.pt")
    nothing = tmp_path / "nothing.pt"
    torch.save({"key_proj.shrinkage_proj.weight": torch.zeros(1, 1, 1, 1)}, nothing)  # ours, wrong shape
    with pytest.raises(ValueError, match="nothing.pt.*not one tensor matches"):
        init_from_checkpoint(bigger, nothing)
    unknown = tmp_path / "unknown.pt"
    torch.save({"foo.weight": torch.zeros(1)}, unknown)
    with pytest.raises(ValueError, match="unknown.pt"):
        init_from_checkpoint(bigger, unknown)
