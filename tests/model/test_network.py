"""S3Network step by step: shapes at 480×480 and at a padded DAVIS frame 480×854, and the pieces' contracts."""

from __future__ import annotations

import pytest
import torch

from model import build_network, load_model_config
from model.modules import anisotropic_l2_similarity
from model.network import pad_to_multiple


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_network(load_model_config("tiny")).eval()


@pytest.mark.parametrize(("h", "w"), [(480, 480), (480, 854)])
def test_one_frame_step_shapes(tiny, h, w):
    net, n = tiny, 2
    ph, pw = h + (-h) % 32, w + (-w) % 32  # 480×854 → 480×864
    gh, gw = ph // 16, pw // 16
    image = torch.rand(1, 3, h, w)
    with torch.no_grad():
        ms_feat, pix_feat = net.encode_image(image)
        assert [tuple(f.shape) for f in ms_feat] == [(1, d, ph // s, pw // s) for d, s in zip(net.ms_dims, (16, 8, 4), strict=True)]
        assert pix_feat.shape == (1, net.pixel_dim, gh, gw)
        key, shrinkage, selection = net.transform_key(ms_feat[0])
        assert key.shape == (1, net.key_dim, gh, gw) and shrinkage.shape == (1, 1, gh, gw)
        assert selection.shape == key.shape and (shrinkage >= 1).all() and ((selection > 0) & (selection < 1)).all()

        masks = torch.zeros(1, n, h, w)
        masks[0, 0, 100:200, 100:300] = 1
        masks[0, 1, 250:400, 500:800] = 1
        sensory = torch.zeros(1, n, net.sensory_dim, gh, gw)
        value, sensory, summaries, _ = net.encode_mask(image, pix_feat, sensory, masks)
        assert value.shape == (1, n, net.value_dim, gh, gw) and sensory.shape == (1, n, net.sensory_dim, gh, gw)
        assert summaries.shape == (1, n, net.num_queries, net.embed_dim + 1)

        readout, aux = net.read_memory(key, selection, key.unsqueeze(2), shrinkage.unsqueeze(2), value.unsqueeze(3),
                                       summaries.unsqueeze(2), pix_feat, sensory, masks, None)
        assert readout.shape == (1, n, net.embed_dim, gh, gw)
        assert len(aux["q_logits"]) == net.cfg.object_transformer.num_blocks + 1
        new_sensory, logits, prob = net.segment(ms_feat, readout, sensory)
        assert logits.shape == prob.shape == (1, n + 1, ph, pw)
        assert new_sensory.shape == sensory.shape
        assert torch.allclose(prob.sum(1), torch.ones(1, ph, pw), atol=1e-5)
        aux_out = net.compute_aux(pix_feat, aux, None)
        assert aux_out["sensory_logits"].shape == (1, n + 1, gh, gw)
        assert aux_out["q_logits"].shape == (1, n + 1, net.cfg.object_transformer.num_blocks + 1, gh, gw)


def test_encode_image_normalises_and_pads(tiny):
    img = torch.rand(1, 3, 70, 100)
    assert pad_to_multiple(img, 32).shape[-2:] == (96, 128)
    ms_feat, _ = tiny.encode_image(img)
    assert ms_feat[0].shape[-2:] == (6, 8)
    with pytest.raises(ValueError, match="RGB"):
        tiny.encode_image(torch.rand(1, 4, 64, 64))


def test_similarity_is_negative_anisotropic_l2():
    torch.manual_seed(0)
    mk, qk = torch.randn(1, 4, 5), torch.randn(1, 4, 3)
    qe, ms = torch.rand(1, 4, 3), torch.rand(1, 1, 5) + 1
    sim = anisotropic_l2_similarity(mk, ms, qk, qe)
    ref = -(qe[0, :, None, :] * (mk[0, :, :, None] - qk[0, :, None, :]) ** 2).sum(0) * ms[0, 0, :, None] / 2
    assert torch.allclose(sim[0], ref, atol=1e-5)


def test_aux_mask_splits_queries_into_foreground_and_background(tiny):
    ot = tiny.object_transformer
    logits = torch.full((1, 2, 2, 2), -5.0)
    logits[0, 0, 0, 0] = 5.0  # object 1 wins pixel 0; object 2 wins nothing
    mask = ot.attention_mask(logits, None).view(1, 2, ot.num_heads, ot.num_queries, 4)
    half = ot.num_queries // 2
    # object 1: fg queries see only pixel 0, bg queries see pixels 1..3
    assert mask[0, 0, :, :half].tolist() == [[[False, True, True, True]] * half] * ot.num_heads
    assert mask[0, 0, :, half:].tolist() == [[[True, False, False, False]] * half] * ot.num_heads
    # object 2 has no foreground: its fully blocked fg rows are unblocked
    assert not mask[0, 1].any()


def test_mask_encoder_imagenet_weights(tmp_path):
    import timm

    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save(reference.state_dict(), path)
    net = build_network(load_model_config("tiny", {"mask_encoder": {"weights": str(path)}}))
    enc = net.mask_encoder
    assert torch.equal(enc.conv1.weight[:, :3], reference.conv1.weight)
    assert enc.conv1.weight[:, 3:].abs().sum() > 0  # the two mask channels: orthogonal init
    assert torch.equal(enc.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    state = reference.state_dict()
    del state["layer2.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="layer2.0.conv1.weight"):
        build_network(load_model_config("tiny", {"mask_encoder": {"weights": str(path)}}))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        build_network(load_model_config("tiny", {"mask_encoder": {"weights": str(tmp_path / "absent.pth")}}))


def test_batchnorm_statistics_stay_frozen_where_cutie_freezes_them():
    from model.summary import RANDOM_ENCODER

    net = build_network(load_model_config("cutie_base", RANDOM_ENCODER)).train()
    bns = [m for name in ("mask_encoder", "pixel_encoder") for m in getattr(net, name).modules()
           if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert net.object_transformer.training


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_s3_shapes_on_a_davis_frame():
    """The spec's measured shapes (section 2) with the full-size S3 on a 480×854 DAVIS frame (padded to 480×864)."""
    from model.summary import RANDOM_ENCODER

    torch.manual_seed(0)
    net = build_network(load_model_config("s3", RANDOM_ENCODER)).eval()
    image, n = torch.rand(1, 3, 480, 854), 2
    with torch.no_grad():
        ms_feat, pix_feat = net.encode_image(image)
        assert [tuple(f.shape) for f in ms_feat] == [(1, 768, 30, 54), (1, 768, 60, 108), (1, 768, 120, 216)]
        assert pix_feat.shape == (1, 256, 30, 54)
        key, shrinkage, selection = net.transform_key(ms_feat[0])
        assert key.shape == selection.shape == (1, 64, 30, 54)
        masks = torch.zeros(1, n, 480, 854)
        masks[0, 0, 100:300, 100:400] = 1
        masks[0, 1, 200:450, 500:800] = 1
        value, sensory, summaries, _ = net.encode_mask(image, pix_feat, torch.zeros(1, n, 256, 30, 54), masks)
        assert value.shape == sensory.shape == (1, n, 256, 30, 54)
        assert summaries.shape == (1, n, 8, 257)
        readout, aux = net.read_memory(key, selection, key.unsqueeze(2), shrinkage.unsqueeze(2), value.unsqueeze(3),
                                       summaries.unsqueeze(2), pix_feat, sensory, masks, None)
        assert readout.shape == (1, n, 256, 30, 54) and len(aux["q_logits"]) == 6
        _, logits, prob = net.segment(ms_feat, readout, sensory)
        assert logits.shape == (1, n + 1, 480, 864)
        assert torch.isfinite(prob).all()
