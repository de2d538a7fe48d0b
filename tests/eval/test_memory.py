"""The inference memory: XMem similarity, top-k readout, FIFO working memory, long-term consolidation, buckets."""

from __future__ import annotations

import math

import pytest
import torch

from model.inference import InferenceConfig, MemoryManager, similarity, topk_softmax


def test_similarity_is_scaled_negative_weighted_l2():
    g = torch.Generator().manual_seed(0)
    mk, qk = torch.randn(1, 8, 5, generator=g), torch.randn(1, 8, 7, generator=g)
    ms, qe = torch.rand(1, 1, 5, generator=g) + 1, torch.rand(1, 8, 7, generator=g)
    sim = similarity(mk, ms, qk, qe)
    for i in range(5):
        for j in range(7):
            d = (qe[0, :, j] * (mk[0, :, i] - qk[0, :, j]) ** 2).sum()
            assert sim[0, i, j] == pytest.approx(float(-d * ms[0, 0, i] / math.sqrt(8)), rel=1e-5, abs=1e-5)


def test_topk_softmax_keeps_k_and_counts_usage():
    sim = torch.randn(2, 50, 9)
    aff, usage = topk_softmax(sim, 30)
    assert torch.all((aff > 0).sum(1) == 30)
    torch.testing.assert_close(aff.sum(1), torch.ones(2, 9))
    torch.testing.assert_close(usage, aff.sum(2))
    top = sim.topk(30, dim=1).indices
    assert torch.all(aff.gather(1, top) > 0)


def _frame(h=4, w=5, ck=6, cv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    key = torch.randn(1, ck, h, w, generator=g)
    return key, torch.rand(1, 1, h, w, generator=g) + 1, torch.rand(1, ck, h, w, generator=g), torch.randn(1, cv, h, w, generator=g)


def test_fifo_keeps_permanent_first_frame():
    mm = MemoryManager(top_k=30, max_mem_frames=3)
    firsts = None
    for t in range(6):
        k, s, e, v = _frame(seed=t)
        mm.add(k, s, e, {1: v}, None, [1] if t == 0 else [])
        if t == 0:
            firsts = k.flatten(2)
    work = mm.buckets[0].work
    assert len(work) == 3 * 20 and work.perm == 20  # the permanent frame + the newest 2
    torch.testing.assert_close(work.key[..., :20], firsts)
    torch.testing.assert_close(work.key[..., -20:], _frame(seed=5)[0].flatten(2))


def test_long_term_consolidation_bounds_memory():
    mm = MemoryManager(top_k=5, max_mem_frames=5, use_long_term=True, long_max_mem_frames=4, long_min_mem_frames=2,
                       num_prototypes=6, max_num_tokens=20, buffer_tokens=4)
    for t in range(12):
        k, s, e, v = _frame(seed=t)
        mm.add(k, s, e, {1: v}, None, [1] if t == 0 else [])
        out = mm.read(*_frame(seed=100 + t)[0::2])
        assert out[1].shape == (1, 3, 4, 5)
        b = mm.buckets[0]
        assert b.work.non_perm < 3 * 20  # consolidated once 3 non-permanent frames are reached
        assert len(b.long) <= 20
    assert len(mm.buckets[0].long) > 0


def test_pruning_keeps_each_batch_rows_own_most_used_tokens():
    """With flip (B = 2) the rows' long-term memories hold different prototypes, so each row is pruned by its own
    usage, most used first (Cutie's remove_obsolete_features); the permanent part stays in front."""
    from model.inference.memory import TokenStore

    store = TokenStore()
    key = torch.arange(2 * 3 * 6, dtype=torch.float32).view(2, 3, 6)
    store.add(key[..., :1], key[:, :1, :1], key[..., :1], key[:, None, :, :1], permanent=True)
    store.add(key[..., 1:], key[:, :1, 1:], key[..., 1:], key[:, None, :, 1:])
    store.usage = torch.tensor([[9.0, 5, 1, 4, 2, 3], [9.0, 1, 5, 2, 4, 3]])
    mm = MemoryManager(top_k=5, max_mem_frames=5, use_long_term=True, num_prototypes=1, max_num_tokens=4,
                       buffer_tokens=1)
    mm._prune(store)  # keeps 4 - 1 - 1 = 2 tokens per row
    assert len(store) == 3 and store.perm == 1
    torch.testing.assert_close(store.key[0, 0], torch.tensor([0.0, 1, 3]))  # row 0: tokens 1 (5), 3 (4)
    torch.testing.assert_close(store.key[1, 0], torch.tensor([18.0, 20, 22]))  # row 1: tokens 2 (5), 4 (4)
    torch.testing.assert_close(store.value[1, 0, 2], torch.tensor([30.0, 32, 34]))
    torch.testing.assert_close(store.usage, torch.tensor([[9.0, 5, 4], [9.0, 5, 4]]))
    store.keep(torch.tensor([1]))  # 1-D: the same token for every row
    torch.testing.assert_close(store.key[:, 0], torch.tensor([[0.0, 3], [18.0, 22]]))


def _readout_by_hand(frames, qk, qe, top_k):
    """XMem's readout written out per query pixel in float64: frames = [(key (CK, L), shrinkage (L,), value (CV, L))]
    of the memory one object reads; similarity -sum_c e_c (k_c - q_c)^2 * s / sqrt(CK), softmax over the top_k
    most similar memory tokens (all when there are no more), value weighted by it. -> (CV, N)."""
    key = torch.cat([f[0] for f in frames], 1).double()
    shr = torch.cat([f[1] for f in frames]).double()
    val = torch.cat([f[2] for f in frames], 1).double()
    qk, qe = qk.double(), qe.double()
    ck, n = qk.shape
    out = torch.zeros(val.shape[0], n, dtype=torch.float64)
    for j in range(n):
        sim = -(qe[:, j:j + 1] * (key - qk[:, j:j + 1]) ** 2).sum(0) * shr / math.sqrt(ck)
        top = sorted(range(len(sim)), key=lambda i: -float(sim[i]))[:top_k]
        w = torch.exp(sim[top] - sim[top].max())
        out[:, j] = (val[:, top] * (w / w.sum())).sum(1)
    return out


def test_late_objects_get_their_own_bucket_and_readout():
    mm = MemoryManager(top_k=30, max_mem_frames=5)
    k0, s0, e0, v0 = _frame(seed=0)
    mm.add(k0, s0, e0, {1: v0}, None, [1])
    k1, s1, e1, v1 = _frame(seed=1)
    w1 = _frame(seed=7)[3]  # object 4's own value, unrelated to object 1's
    mm.add(k1, s1, e1, {1: v1, 4: w1}, None, [4])
    assert mm.objects == [1, 4]
    assert len(mm.buckets[0].work) == 40 and len(mm.buckets[1].work) == 20
    qk, _, qe, _ = _frame(seed=2)
    out = mm.read(qk, qe)
    assert set(out) == {1, 4} and out[4].shape == out[1].shape == (1, 3, 4, 5)

    def flat(x):
        return x[0].flatten(1)

    # object 1 reads frames 0 and 1 (40 tokens, top 30); object 4, registered at frame 1, reads frame 1 only
    # (20 tokens, all of them) and its own value there
    ref1 = _readout_by_hand([(flat(k0), flat(s0)[0], flat(v0)), (flat(k1), flat(s1)[0], flat(v1))],
                            flat(qk), flat(qe), 30)
    ref4 = _readout_by_hand([(flat(k1), flat(s1)[0], flat(w1))], flat(qk), flat(qe), 30)
    torch.testing.assert_close(out[1][0].flatten(1).double(), ref1, rtol=0, atol=1e-5)
    err = float((out[4][0].flatten(1).double() - ref4).abs().max())
    assert err < 1e-5, f"object 4's readout is {err:.3g} from softmax(sim(frame 1)) @ object 4's value at frame 1"


def test_config_validation():
    with pytest.raises(ValueError, match="unknown keys"):
        InferenceConfig.from_any({"inference": {"mem_evry": 3}})
    with pytest.raises(ValueError, match="mem_every"):
        InferenceConfig(mem_every=0)
    assert InferenceConfig.from_any({"size": 600}, flip=True).flip


def test_config_accepts_cutie_spellings():
    c = InferenceConfig.from_any({"inference": {"flip_aug": True, "use_long_term": True,
                                                "long_term": {"max_mem_frames": 25, "min_mem_frames": 15,
                                                              "count_usage": True}}})
    assert c.flip and c.long_max_mem_frames == 25 and c.long_min_mem_frames == 15
    with pytest.raises(ValueError, match="long_term.bogus"):
        InferenceConfig.from_any({"long_term": {"bogus": 1}})
