"""Cutie's (= S3's) losses: point-sampled cross-entropy + soft Dice on frames 1..T-1, auxiliary losses.

Points are chosen PointRend-style: `oversample_ratio · num_points` uniform candidates, the `importance_sample_ratio`
most uncertain ones (smallest top-1 − top-2 logit margin) kept, the rest uniform. Labels and logits are read at
those points by bilinear sampling (grid_sample, align_corners=False). Random draws use torch's global RNG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import LossConfig


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W), coords (B, P, 2) in [0, 1]² (x, y) → (B, C, P)."""
    return F.grid_sample(x, 2.0 * coords.unsqueeze(2) - 1.0, align_corners=False).squeeze(3)


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """(B, C, P) → (B, P): higher = more uncertain (negative margin between the two best classes)."""
    if logits.shape[1] == 1:
        return -logits[:, 0].abs()
    top2 = torch.topk(logits, k=2, dim=1)[0]
    return top2[:, 1] - top2[:, 0]


def uncertain_points(logits: torch.Tensor, num_points: int, oversample: float, importance: float,
                     scale: torch.Tensor | None = None) -> torch.Tensor:
    """(B, P, 2) points in [0, 1]², the most uncertain first; `scale` maps them into the logits' valid part."""
    b = logits.shape[0]
    candidates = torch.rand(b, int(num_points * oversample), 2, device=logits.device)
    scores = uncertainty(point_sample(logits, candidates if scale is None else candidates * scale))
    n_uncertain = int(importance * num_points)
    idx = torch.topk(scores, k=n_uncertain, dim=1)[1]
    chosen = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    rest = torch.rand(b, num_points - n_uncertain, 2, device=logits.device)
    return torch.cat([chosen, rest], 1)


def ce_loss(point_logits: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """(T, C, P) logits and soft labels → CE summed over T, averaged over points."""
    return F.cross_entropy(point_logits, point_labels, reduction="none").sum(0).mean()


def dice_loss(point_prob: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
    """Soft Dice over the foreground channels only: summed over T, averaged over objects."""
    prob, gt = point_prob[:, 1:], point_labels[:, 1:]
    if prob.shape[1] == 0:  # no foreground object
        return point_prob.new_zeros(())
    numerator = 2 * (prob * gt).sum(-1)
    denominator = prob.sum(-1) + gt.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum(0).mean()


def one_hot(cls_gt: torch.Tensor, num_objects: int) -> torch.Tensor:
    """(T, 1, H, W) int64 with values 0..num_objects → (T, num_objects + 1, H, W) float."""
    if int(cls_gt.max()) > num_objects or int(cls_gt.min()) < 0:
        raise ValueError(f"cls_gt holds labels {torch.unique(cls_gt).tolist()} but only {num_objects} objects "
                         "are selected")
    return torch.zeros(cls_gt.shape[0], num_objects + 1, *cls_gt.shape[-2:], device=cls_gt.device).scatter_(
        1, cls_gt.long(), 1.0)


class LossComputer:
    def __init__(self, cfg: LossConfig) -> None:
        self.cfg = cfg

    def mask_loss(self, logits: torch.Tensor, soft_gt: torch.Tensor, extent: tuple[float, float] = (1.0, 1.0)
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (T, C, h, w) at any resolution, soft_gt (T, C, H, W) → (CE, Dice) on sampled points.

        `extent` (y, x): the fraction of the logits' map the ground truth covers (the rest is padding)."""
        c = self.cfg
        logits = logits.float()
        scale = torch.tensor([extent[1], extent[0]], device=logits.device)
        with torch.no_grad():
            coords = uncertain_points(logits, c.num_points, c.oversample_ratio, c.importance_sample_ratio, scale)
            labels = point_sample(soft_gt, coords)
        point_logits = point_sample(logits, coords * scale)
        return ce_loss(point_logits, labels), dice_loss(point_logits.softmax(dim=1), labels)

    def compute(self, logits: list[torch.Tensor], aux: list[dict[str, torch.Tensor]], cls_gt: torch.Tensor,
                num_objects: list[int], aux_extent: tuple[float, float] = (1.0, 1.0)) -> dict[str, torch.Tensor]:
        """logits: per supervised frame (B, N+1, H, W); aux: per frame the compute_aux dict (stride 16, over the
        padded image: `aux_extent` = H/H_padded, W/W_padded); cls_gt (B, T, 1, H, W) of the supervised frames
        → {loss/mask_ce, loss/mask_dice, loss/aux_sensory, loss/aux_query, total_loss}."""
        b = cls_gt.shape[0]
        zero = logits[0].new_zeros(()).float()
        terms = {"loss/mask_ce": zero, "loss/mask_dice": zero, "loss/aux_sensory": zero, "loss/aux_query": zero}
        for bi in range(b):
            n = num_objects[bi]
            soft_gt = one_hot(cls_gt[bi], n)
            frame_logits = torch.stack([lg[bi, :n + 1] for lg in logits], 0)
            ce, dice = self.mask_loss(frame_logits, soft_gt)
            terms["loss/mask_ce"] = terms["loss/mask_ce"] + ce / b
            terms["loss/mask_dice"] = terms["loss/mask_dice"] + dice / b
            if self.cfg.aux_sensory_weight > 0:
                sensory = torch.stack([a["sensory_logits"][bi, :n + 1] for a in aux], 0)
                ce, dice = self.mask_loss(sensory, soft_gt, aux_extent)
                terms["loss/aux_sensory"] = terms["loss/aux_sensory"] + (ce + dice) / b * self.cfg.aux_sensory_weight
            if self.cfg.aux_query_weight > 0:
                levels = aux[0]["q_logits"].shape[2]
                for level in range(levels):
                    q = torch.stack([a["q_logits"][bi, :n + 1, level] for a in aux], 0)
                    ce, dice = self.mask_loss(q, soft_gt, aux_extent)
                    terms["loss/aux_query"] = terms["loss/aux_query"] + (ce + dice) / b * self.cfg.aux_query_weight
        terms["total_loss"] = sum(terms.values(), zero)
        return terms
