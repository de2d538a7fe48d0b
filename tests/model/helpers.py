"""Synthetic training batches in the loader's format (docs/architecture.md section 3)."""

from __future__ import annotations

import torch


def make_batch(b: int = 2, t: int = 8, h: int = 64, w: int = 64, objects: tuple[int, ...] = (2, 2),
               seed: int = 0) -> dict:
    """Moving rectangles: sample i has objects[i] objects (slots 1..k), padded to max(objects)."""
    g = torch.Generator().manual_seed(seed)
    n = max(objects)
    rgb = torch.rand(b, t, 3, h, w, generator=g) * 0.3
    cls_gt = torch.zeros(b, t, 1, h, w, dtype=torch.long)
    for bi in range(b):
        for k in range(1, objects[bi] + 1):
            y0 = int(torch.randint(0, h // 2, (1,), generator=g))
            x0 = int(torch.randint(0, w // 2, (1,), generator=g))
            for ti in range(t):
                y, x = min(y0 + ti, h - h // 4), min(x0 + ti, w - w // 4)
                cls_gt[bi, ti, 0, y:y + h // 4, x:x + w // 4] = k
                rgb[bi, ti, k % 3, y:y + h // 4, x:x + w // 4] += 0.6
    first = torch.zeros(b, 1, n, h, w)
    for k in range(1, n + 1):
        first[:, 0, k - 1] = (cls_gt[:, 0, 0] == k).float()
    selector = torch.zeros(b, n)
    for bi in range(b):
        selector[bi, :objects[bi]] = 1
    info = [{"key": f"clip{bi}", "dataset": "synthetic", "video": f"v{bi}", "frames": [str(i) for i in range(t)],
             "object_ids": list(range(1, objects[bi] + 1)), "level": "skip05"} for bi in range(b)]
    return {"rgb": rgb.clamp(0, 1), "cls_gt": cls_gt, "first_frame_gt": first, "selector": selector, "info": info}
