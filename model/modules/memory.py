"""The memory read used in training (inference keeps its own top-k memory, model.inference.memory).

XMem's anisotropic L2 similarity between memory keys k_m and a query key k_q with selection e_q:
    s(m, q) = -sum_c e_q,c (k_m,c - k_q,c)² · shrinkage_m / sqrt(CK)
A softmax over all memory positions (no top-k in training) gives the affinity, which reads out the values.
"""

from __future__ import annotations

import math

import torch


def anisotropic_l2_similarity(mem_key: torch.Tensor, mem_shrinkage: torch.Tensor | None, query_key: torch.Tensor,
                              query_selection: torch.Tensor | None) -> torch.Tensor:
    """mem_key (B, CK, *M), mem_shrinkage (B, 1, *M), query_key/selection (B, CK, *Q) → (B, M, Q) in fp32."""
    ck = mem_key.shape[1]
    mk = mem_key.flatten(2).float().transpose(1, 2)  # B, M, CK
    qk = query_key.flatten(2).float()  # B, CK, Q
    if query_selection is not None:
        qe = query_selection.flatten(2).float()
        sim = 2 * (mk @ (qk * qe)) - (mk * mk) @ qe - (qe * qk * qk).sum(1, keepdim=True)
    else:
        sim = 2 * (mk @ qk) - (mk * mk).sum(2, keepdim=True) - (qk * qk).sum(1, keepdim=True)
    if mem_shrinkage is not None:
        sim = sim * mem_shrinkage.flatten(1).float().unsqueeze(2)
    return sim / math.sqrt(ck)


def softmax_affinity(similarity: torch.Tensor) -> torch.Tensor:
    """Softmax over the memory axis (1): each query position's weights over all memory positions sum to 1."""
    return torch.softmax(similarity, dim=1)


def memory_readout(affinity: torch.Tensor, mem_value: torch.Tensor) -> torch.Tensor:
    """affinity (B, M, HW), mem_value (B, CV, T, h, w) with M = T·h·w → readout (B, CV, HW) in fp32."""
    b, cv = mem_value.shape[:2]
    return torch.bmm(mem_value.reshape(b, cv, -1).float(), affinity)
