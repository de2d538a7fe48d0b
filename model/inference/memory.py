"""Key-value memory for inference: XMem's anisotropic L2 similarity, top-k softmax readout with usage counting, a
permanent first-frame memory, a FIFO or long-term (prototype-consolidated) working memory.

Objects registered together share a *bucket*: the memory frames they can read are those written since they were
registered (objects that appear at a later frame, as in YouTube-VOS, get their own bucket). All tensors carry a batch
axis B (1, or 2 with flip test-time augmentation); tokens are flattened along the last axis.
"""

from __future__ import annotations

import math

import torch


def similarity(mem_key: torch.Tensor, mem_shrinkage: torch.Tensor | None, query_key: torch.Tensor,
               query_selection: torch.Tensor | None) -> torch.Tensor:
    """Negative anisotropic squared L2 distance (XMem), scaled by the memory shrinkage and 1/sqrt(CK).

    mem_key (B, CK, M), mem_shrinkage (B, 1, M), query_key (B, CK, N), query_selection (B, CK, N) -> (B, M, N).
    """
    ck = mem_key.shape[1]
    mk = mem_key.transpose(1, 2)  # B, M, CK
    if query_selection is not None:
        a_sq = (mk * mk) @ query_selection
        two_ab = 2 * (mk @ (query_key * query_selection))
        b_sq = (query_selection * query_key * query_key).sum(1, keepdim=True)
    else:
        a_sq = (mk * mk).sum(2, keepdim=True)
        two_ab = 2 * (mk @ query_key)
        b_sq = (query_key * query_key).sum(1, keepdim=True)
    sim = two_ab - a_sq - b_sq
    if mem_shrinkage is not None:
        sim = sim * mem_shrinkage.transpose(1, 2)
    return sim / math.sqrt(ck)


def topk_softmax(sim: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the memory axis (1) restricted to the top-k entries per query. Returns (affinity (B, M, N),
    usage (B, M) = the affinity each memory token received, summed over the queries)."""
    if top_k is not None and top_k < sim.shape[1]:
        values, idx = torch.topk(sim, k=top_k, dim=1)
        weights = torch.softmax(values, dim=1)
        affinity = torch.zeros_like(sim).scatter_(1, idx, weights)
    else:
        affinity = torch.softmax(sim, dim=1)
    return affinity, affinity.sum(dim=2)


class TokenStore:
    """Tokens of one memory (working or long-term) of one bucket: the first `perm` tokens are permanent."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None  # B, CK, L
        self.shrinkage: torch.Tensor | None = None  # B, 1, L
        self.selection: torch.Tensor | None = None  # B, CK, L
        self.value: torch.Tensor | None = None  # B, N, CV, L
        self.usage: torch.Tensor | None = None  # B, L (accumulated affinity)
        self.life: torch.Tensor | None = None  # B, L (reads since added)
        self.perm = 0

    def __len__(self) -> int:
        return 0 if self.key is None else self.key.shape[-1]

    @property
    def non_perm(self) -> int:
        return len(self) - self.perm

    def add(self, key, shrinkage, selection, value, *, permanent: bool = False) -> None:
        b, _, n = key.shape
        usage = torch.zeros(b, n, device=key.device)
        life = torch.zeros(b, n, device=key.device)
        parts = {"key": key, "shrinkage": shrinkage, "selection": selection, "value": value, "usage": usage,
                 "life": life}
        for name, new in parts.items():
            old = getattr(self, name)
            if old is None:
                setattr(self, name, new)
            elif permanent:  # permanent tokens stay in front
                setattr(self, name, torch.cat([old[..., :self.perm], new, old[..., self.perm:]], -1))
            else:
                setattr(self, name, torch.cat([old, new], -1))
        if permanent:
            self.perm += n

    def keep(self, index: torch.Tensor) -> None:
        """Keep the non-permanent tokens at `index` (into the non-permanent part), the permanent ones all, in that
        order. `index` is 1-D (the same tokens for every batch row) or (B, n) (each row its own tokens, as Cutie
        prunes the long-term memory of a flipped batch row by that row's usage)."""
        perm = torch.arange(self.perm, device=index.device)
        if index.dim() == 1:
            idx = torch.cat([perm, index + self.perm])
            for name in ("key", "shrinkage", "selection", "value", "usage", "life"):
                setattr(self, name, getattr(self, name).index_select(-1, idx))
            return
        b = index.shape[0]
        idx = torch.cat([perm.expand(b, -1), index + self.perm], 1)  # B, L'
        for name in ("key", "shrinkage", "selection", "value", "usage", "life"):
            t = getattr(self, name)
            rows = idx.view(b, *([1] * (t.dim() - 2)), idx.shape[1]).expand(*t.shape[:-1], idx.shape[1])
            setattr(self, name, torch.gather(t, -1, rows))

    def update_usage(self, usage: torch.Tensor) -> None:
        self.usage += usage
        self.life += 1

    def normalized_usage(self) -> torch.Tensor:
        return self.usage / self.life.clamp(min=1)


class Bucket:
    """The memory of a group of objects registered on the same frame."""

    def __init__(self, objects: list[int]) -> None:
        self.objects = list(objects)
        self.work = TokenStore()
        self.long = TokenStore()


class MemoryManager:
    def __init__(self, top_k: int, max_mem_frames: int, use_long_term: bool = False, long_max_mem_frames: int = 10,
                 long_min_mem_frames: int = 5, num_prototypes: int = 128, max_num_tokens: int = 10000,
                 buffer_tokens: int = 2000) -> None:
        self.top_k = top_k
        self.use_long_term = use_long_term
        # frames besides the permanent one
        self.max_frames = (long_max_mem_frames if use_long_term else max_mem_frames) - 1
        self.min_frames = long_min_mem_frames - 1
        self.num_prototypes = num_prototypes
        self.max_num_tokens = max_num_tokens
        self.buffer_tokens = buffer_tokens
        self.buckets: list[Bucket] = []
        self.obj_memory: dict[int, torch.Tensor] = {}  # id -> (B, Q, C+1), streaming sum of object summaries
        self.sensory: dict[int, torch.Tensor] = {}  # id -> (B, C_s, h, w)

    def clear(self) -> None:
        self.buckets = []
        self.obj_memory = {}
        self.sensory = {}

    @property
    def objects(self) -> list[int]:
        return [o for b in self.buckets for o in b.objects]

    def engaged(self) -> bool:
        return any(len(b.work) for b in self.buckets)

    # ------------------------------------------------------------------------------------------------- reading
    def read(self, query_key: torch.Tensor, query_selection: torch.Tensor) -> dict[int, torch.Tensor]:
        """Visual readout per object: id -> (B, CV, h, w)."""
        b, _, h, w = query_key.shape
        qk = query_key.flatten(2).float()
        qe = query_selection.flatten(2).float() if query_selection is not None else None
        out: dict[int, torch.Tensor] = {}
        for bucket in self.buckets:
            stores = [s for s in (bucket.long, bucket.work) if len(s)]
            if not stores:
                continue
            key = torch.cat([s.key for s in stores], -1)
            shrinkage = torch.cat([s.shrinkage for s in stores], -1)
            value = torch.cat([s.value for s in stores], -1)
            aff, usage = topk_softmax(similarity(key, shrinkage, qk, qe), self.top_k)
            if self.use_long_term:
                start = 0
                for s in stores:
                    s.update_usage(usage[:, start:start + len(s)])
                    start += len(s)
            n, cv = value.shape[1:3]
            readout = (value.flatten(1, 2) @ aff).view(b, n, cv, h, w)
            for i, obj in enumerate(bucket.objects):
                out[obj] = readout[:, i]
        return out

    # ------------------------------------------------------------------------------------------------- writing
    def add(self, key: torch.Tensor, shrinkage: torch.Tensor, selection: torch.Tensor | None,
            values: dict[int, torch.Tensor], obj_summaries: dict[int, torch.Tensor] | None,
            new_objects: list[int]) -> None:
        """Write one memory frame. values: id -> (B, CV, h, w) for every tracked object; new_objects start a
        bucket whose first frame (this one) is permanent."""
        b, _, h, w = key.shape
        hw = h * w
        key = key.flatten(2).float()
        shrinkage = shrinkage.flatten(2).float()
        selection = selection.flatten(2).float() if selection is not None else torch.ones_like(key)
        if new_objects:
            self.buckets.append(Bucket(new_objects))
        for bucket in self.buckets:
            value = torch.stack([values[o].flatten(2).float() for o in bucket.objects], 1)
            permanent = len(bucket.work) == 0
            bucket.work.add(key, shrinkage, selection, value, permanent=permanent)
            if self.use_long_term:
                if bucket.work.non_perm >= self.max_frames * hw:
                    self._consolidate(bucket, hw)
            elif bucket.work.non_perm > self.max_frames * hw:  # FIFO of max_frames non-permanent frames
                excess = bucket.work.non_perm - self.max_frames * hw
                bucket.work.keep(torch.arange(excess, bucket.work.non_perm, device=key.device))
        if obj_summaries:
            for obj, s in obj_summaries.items():
                self.obj_memory[obj] = self.obj_memory[obj] + s.float() if obj in self.obj_memory else s.float()

    def _consolidate(self, bucket: Bucket, hw: int) -> None:
        """Move all but the newest min_frames working frames into long-term memory as prototypes."""
        work, long = bucket.work, bucket.long
        keep_n = self.min_frames * hw
        n_cand = work.non_perm - keep_n
        if n_cand <= 0:
            return
        sl = slice(work.perm, work.perm + n_cand)
        c_key, c_shr, c_sel = work.key[..., sl], work.shrinkage[..., sl], work.selection[..., sl]
        c_val, c_usage = work.value[..., sl], work.normalized_usage()[..., sl]
        k = min(self.num_prototypes, n_cand)
        idx = torch.topk(c_usage, k=k, dim=-1).indices  # B, k (per batch element: flipped frames differ)
        p_key = torch.gather(c_key, 2, idx[:, None].expand(-1, c_key.shape[1], -1))
        p_sel = torch.gather(c_sel, 2, idx[:, None].expand(-1, c_sel.shape[1], -1))
        # potentiation: prototype values are read out of all candidates (plain softmax, no top-k)
        aff, _ = topk_softmax(similarity(c_key, c_shr, p_key, p_sel), None)
        p_val = (c_val.flatten(1, 2) @ aff).view(*c_val.shape[:3], k)
        p_shr = c_shr @ aff
        work.keep(torch.arange(n_cand, work.non_perm, device=c_key.device))
        if len(long) and long.non_perm >= self.max_num_tokens - self.num_prototypes:
            self._prune(long)
        long.add(p_key, p_shr, p_sel, p_val)

    def _prune(self, long: TokenStore) -> None:
        """Make room in a full long-term memory: each batch row keeps its own most used tokens, most used first
        (Cutie's remove_obsolete_features; with flip the rows hold different prototypes)."""
        target = self.max_num_tokens - self.num_prototypes - self.buffer_tokens
        long.keep(torch.topk(long.normalized_usage()[..., long.perm:], k=target, dim=-1).indices)
