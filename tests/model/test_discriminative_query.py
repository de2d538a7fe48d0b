"""DiscriminativeQueryAttention (spec 2.3) on hand-built inputs: it gathers the argmax pixel inside the mask."""

from __future__ import annotations

import torch

from model.modules import DiscriminativeQueryAttention


def _identity_layer(dim: int, heads: int) -> DiscriminativeQueryAttention:
    layer = DiscriminativeQueryAttention(dim, heads)
    with torch.no_grad():  # make LN/proj/final transparent enough to read the gathered prototype back
        layer.proj.weight.zero_()
        layer.proj.bias.zero_()
        layer.final.weight.copy_(torch.eye(dim))
        layer.final.bias.zero_()
    return layer


def test_picks_the_most_similar_pixel_inside_the_mask_per_query_and_head():
    dim, heads = 4, 2
    layer = _identity_layer(dim, heads)
    # 5 pixels. Head 0 looks at channels 0-1, head 1 at channels 2-3.
    x = torch.tensor([[
        [2.0, -2.0, 2.0, -2.0],
        [1.0, -0.5, 0.0, 0.0],
        [0.0, 0.0, 1.0, -0.2],
        [-1.0, 1.0, -1.0, 1.0],
        [-1.0, 0.2, 0.0, 1.0],
    ]])
    # zero-mean, unit-variance queries pass the LayerNorm unchanged: query 0 points to (+1, -1) in each head,
    # query 1 to (-1, +1)
    q = torch.tensor([[[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]]])
    zeros_q, zeros_x = torch.zeros_like(q), torch.zeros_like(x)
    # query 0 may not see pixel 1, query 1 may not see pixel 3 (their global favourites in head 0)
    allowed = torch.tensor([[True, False, True, True, True], [True, True, True, False, True]])
    mask = (~allowed).unsqueeze(0).repeat(heads, 1, 1)  # (B·heads, Q, HW), True = blocked

    with torch.no_grad():
        qn = layer.norm(q)
        xn, qhat, sim = layer.similarity(qn, x, zeros_q, zeros_x, mask)
    assert torch.allclose(qn, q, atol=1e-4)
    idx = sim.argmax(dim=2)[0]  # heads, Q
    # brute force: per head and query, the dot product of the full-C-normalised vectors, allowed pixels only
    expected = torch.zeros(heads, 2, dtype=torch.long)
    for h in range(heads):
        sl = slice(2 * h, 2 * h + 2)
        for k in range(2):
            scores = [float(xn[0, p, sl] @ qhat[0, k, sl]) if allowed[k, p] else float("-inf") for p in range(5)]
            expected[h, k] = max(range(5), key=lambda p: scores[p])
    assert idx.tolist() == expected.tolist()
    # worked by hand (dot products of the normalised head slices): head 0 → q0: pixel 0 (0.50; pixel 1 with
    # 0.67 is masked), q1: pixel 4 (0.42; pixel 3 with 0.50 is masked); head 1 → q0: pixel 2 (0.59), q1: pixel 4
    assert idx.tolist() == [[0, 4], [2, 4]]
    unmasked = layer.similarity(qn, x, zeros_q, zeros_x, None)[2].argmax(dim=2)[0]
    assert unmasked.tolist() == [[1, 3], [2, 3]]  # without the mask the choice differs

    out, weights = layer(q, x, zeros_q, zeros_x, mask, need_weights=True)
    # with proj = 0 and final = I: out = LN(q) + proto, proto = the gathered head slices of x̂
    proto = out - qn
    assert torch.allclose(proto[0, 0, 0:2], xn[0, 0, 0:2], atol=1e-6)
    assert torch.allclose(proto[0, 0, 2:4], xn[0, 2, 2:4], atol=1e-6)
    assert torch.allclose(proto[0, 1, 0:2], xn[0, 4, 0:2], atol=1e-6)
    assert torch.allclose(proto[0, 1, 2:4], xn[0, 4, 2:4], atol=1e-6)
    assert weights.shape == (1, heads, 2, 5) and weights.sum(-1).eq(1).all()
    assert weights[0, 0, 0, 0] == 1 and weights[0, 1, 0, 2] == 1 and weights[0, 0, 1, 4] == 1


def test_gradient_reaches_only_the_gathered_pixels():
    torch.manual_seed(0)
    layer = DiscriminativeQueryAttention(8, 2)
    x = torch.randn(1, 10, 8, requires_grad=True)
    q = torch.randn(1, 4, 8, requires_grad=True)
    _, _, sim = layer.similarity(layer.norm(q), x, torch.zeros_like(q), torch.zeros_like(x), None)
    chosen = set(sim.argmax(dim=2).flatten().tolist())
    out, _ = layer(q, x, torch.zeros_like(q), torch.zeros_like(x), None)
    out.sum().backward()
    with_grad = {i for i in range(10) if x.grad[0, i].abs().sum() > 0}
    assert with_grad == chosen
    assert q.grad.abs().sum() > 0
