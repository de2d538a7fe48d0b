"""S3Network: the pixel encoder of the config (S3's spatial-semantic encoder, or a ViT/ResNet for the ablations)
inside Cutie's memory network (spec sections 0, 2, 3).

Shapes (B batch, N objects, h×w = H/16×W/16 grid, C = embed_dim, CK = key_dim, S = sensory_dim):

    encode_image(image (B,3,H,W) in [0,1])        → [f16, f8, f4], pix_feat (B, pixel_dim, h, w)
    transform_key(f16)                            → key (B,CK,h,w), shrinkage (B,1,h,w), selection (B,CK,h,w)
    encode_mask(image, pix_feat, sensory, masks)  → value (B,N,CV,h,w), sensory, summaries (B,N,Q,C+1), logits
    read_memory(...)                              → (readout (B,N,C,h,w), aux inputs)      [training]
    pixel_fusion(pix_feat, readout, sensory, last_mask (B,N,H,W))  → (B,N,C,h,w)
    readout_query(pixel, obj_memory (B,N,T,Q,C+1), selector=)       → (B,N,C,h,w), aux
    segment(ms_feat, readout, sensory)            → sensory, logits (B,N+1,H,W), prob (B,N+1,H,W)

Images are padded (bottom/right, zeros) to a multiple of `cfg.pad_to` (32) by encode_image and encode_mask; the
caller crops the outputs back (`segment` returns the padded size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.encoders import (
    PIXEL_ENCODER_FILES,
    build_pixel_encoder,
    check_pixel_encoder_file,
    check_weights_file,
)
from model.modules import (
    KeyProjection,
    MaskDecoder,
    MaskEncoder,
    ObjectSummarizer,
    ObjectTransformer,
    PixelFuser,
    anisotropic_l2_similarity,
    memory_readout,
    softmax_affinity,
)
from model.modules.group import others_of, soft_aggregate
from model.modules.mask_decoder import SensoryAuxHead

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the last two axes at the bottom/right to multiples of `multiple`."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class S3Network(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        check_weight_files(cfg)  # before anything is built (the ViT takes a while)
        self.key_dim, self.value_dim = cfg.key_dim, cfg.value_dim
        self.sensory_dim, self.pixel_dim, self.embed_dim = cfg.sensory_dim, cfg.pixel_dim, cfg.embed_dim
        self.pad_to = cfg.pad_to
        ot = cfg.object_transformer
        self.num_queries = ot.num_queries

        self.pixel_encoder = build_pixel_encoder(cfg.pixel_encoder, cfg.drop_path)
        ms_dims = tuple(int(d) for d in self.pixel_encoder.ms_dims)
        self.ms_dims = ms_dims
        self.pix_feat_proj = nn.Conv2d(ms_dims[0], cfg.pixel_dim, kernel_size=1)
        self.key_proj = KeyProjection(ms_dims[0], cfg.pixel_dim, cfg.key_dim)
        self.mask_encoder = MaskEncoder(cfg.mask_encoder.type, cfg.pixel_dim, cfg.value_dim, cfg.sensory_dim)
        if cfg.mask_encoder.weights:
            self.mask_encoder.load_imagenet_weights(cfg.mask_encoder.weights)
        self.pixel_fuser = PixelFuser(cfg.pixel_dim, cfg.value_dim, cfg.sensory_dim, cfg.embed_dim)
        self.object_summarizer = ObjectSummarizer(cfg.value_dim, cfg.embed_dim, ot.num_queries,
                                                  cfg.summarizer_add_pe, cfg.pixel_pe_scale,
                                                  cfg.pixel_pe_temperature)
        self.object_transformer = ObjectTransformer(cfg.embed_dim, ot.num_queries, ot.num_heads, ot.ff_dim,
                                                    ot.num_blocks, ot.discriminative_query, cfg.pixel_pe_scale,
                                                    cfg.pixel_pe_temperature)
        self.mask_decoder = MaskDecoder(ms_dims, cfg.decoder_up_dims, cfg.sensory_dim)
        self.sensory_aux = SensoryAuxHead(cfg.sensory_dim, cfg.pixel_dim)

        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)

    # ------------------------------------------------------------------------------------------- images
    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-3] != 3:
            raise ValueError(f"expected RGB images (…, 3, H, W), got {tuple(image.shape)}")
        mean = self.pixel_mean.to(device=image.device, dtype=image.dtype)
        std = self.pixel_std.to(device=image.device, dtype=image.dtype)
        return (image - mean) / std

    def encode_image(self, image: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(B, 3, H, W) in [0, 1] → ([f16, f8, f4] of the padded image, pix_feat (B, pixel_dim, h, w))."""
        image = self.normalize(pad_to_multiple(image, self.pad_to))
        ms_feat = list(self.pixel_encoder(image))
        return ms_feat, self.pix_feat_proj(ms_feat[0])

    def transform_key(self, f16: torch.Tensor, *, need_sk: bool = True, need_ek: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return self.key_proj(f16, need_shrinkage=need_sk, need_selection=need_ek)

    # ------------------------------------------------------------------------------------------- masks
    def encode_mask(self, image: torch.Tensor, pix_feat: torch.Tensor, sensory: torch.Tensor,
                    masks: torch.Tensor, *, deep_update: bool = True, chunk_size: int = -1,
                    need_weights: bool = False):
        """image (B,3,H,W) in [0,1]; masks (B,N,H,W) soft or hard → (value, sensory, summaries, summary logits)."""
        image = self.normalize(pad_to_multiple(image, self.pad_to))
        masks = pad_to_multiple(masks, self.pad_to).to(image.dtype)
        if masks.shape[-2:] != image.shape[-2:]:
            raise ValueError(f"masks {tuple(masks.shape)} do not match the image {tuple(image.shape)}")
        value, sensory = self.mask_encoder(image, pix_feat, sensory, masks, others_of(masks),
                                           deep_update=deep_update, chunk_size=chunk_size)
        summaries, logits = self.object_summarizer(masks, value, need_weights)
        return value, sensory, summaries, logits

    # ------------------------------------------------------------------------------------------- reading
    def read_memory(self, query_key: torch.Tensor, query_selection: torch.Tensor, memory_key: torch.Tensor,
                    memory_shrinkage: torch.Tensor, mask_value: torch.Tensor, obj_memory: torch.Tensor | None,
                    pix_feat: torch.Tensor, sensory: torch.Tensor, last_mask: torch.Tensor,
                    selector: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, object]]:
        """The training read (spec 3.4): softmax over all memory pixels of the anisotropic L2 similarity (fp32),
        pixel fusion with the sensory memory and last mask, then the object transformer.

        query_key/selection (B,CK,h,w); memory_key (B,CK,T,h,w); memory_shrinkage (B,1,T,h,w);
        mask_value (B,N,CV,T,h,w); obj_memory (B,N,T',Q,C+1); last_mask (B,N,H,W); selector (B,N,1,1)."""
        b, n, cv = mask_value.shape[:3]
        h, w = query_key.shape[-2:]
        affinity = softmax_affinity(anisotropic_l2_similarity(memory_key, memory_shrinkage, query_key,
                                                              query_selection))
        readout = memory_readout(affinity, mask_value.flatten(1, 2))  # B, N·CV, h·w (fp32)
        readout = readout.view(b, n, cv, h, w).to(pix_feat.dtype)
        pixel = self.pixel_fusion(pix_feat, readout, sensory, last_mask)
        mem_readout, aux = self.readout_query(pixel, obj_memory, selector=selector)
        return mem_readout, {"sensory": sensory, "q_logits": aux["logits"], "attn_mask": aux["attn_mask"]}

    def pixel_fusion(self, pix_feat: torch.Tensor, readout: torch.Tensor, sensory: torch.Tensor,
                     last_mask: torch.Tensor, *, chunk_size: int = -1) -> torch.Tensor:
        last_mask = pad_to_multiple(last_mask, self.pad_to) if last_mask.shape[-2:] != sensory.shape[-2:] else last_mask
        last_mask = F.interpolate(last_mask.float(), size=sensory.shape[-2:], mode="area")
        return self.pixel_fuser(pix_feat, readout, sensory, last_mask, others_of(last_mask), chunk_size=chunk_size)

    def readout_query(self, pixel: torch.Tensor, obj_memory: torch.Tensor | None, *,
                      selector: torch.Tensor | None = None, need_weights: bool = False):
        return self.object_transformer(pixel, obj_memory, selector=selector, need_weights=need_weights)

    # ------------------------------------------------------------------------------------------- output
    def segment(self, ms_feat: list[torch.Tensor], readout: torch.Tensor, sensory: torch.Tensor, *,
                selector: torch.Tensor | None = None, chunk_size: int = -1, update_sensory: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """→ (sensory, logits (B, N+1, H, W) over [background, objects] (fp32), prob = softmax(logits))."""
        sensory, logits = self.mask_decoder(ms_feat, readout, sensory, chunk_size=chunk_size,
                                            update_sensory=update_sensory)
        prob = torch.sigmoid(logits.float())
        if selector is not None:
            prob = prob * selector.float()
        logits = F.interpolate(soft_aggregate(prob, dim=1), scale_factor=4, mode="bilinear", align_corners=False)
        return sensory, logits, torch.softmax(logits, dim=1)

    def compute_aux(self, pix_feat: torch.Tensor, aux_inputs: dict[str, object],
                    selector: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Aux logits over [background, objects] at stride 16: the sensory head (B, N+1, h, w) and the object
        transformer's heads (B, N+1, levels, h, w)."""
        out: dict[str, torch.Tensor] = {"attn_mask": aux_inputs["attn_mask"]}  # type: ignore[dict-item]
        sensory_logits = self.sensory_aux(pix_feat, aux_inputs["sensory"])  # type: ignore[arg-type]
        prob = torch.sigmoid(sensory_logits.float())
        if selector is not None:
            prob = prob * selector.float()
        out["sensory_logits"] = soft_aggregate(prob, dim=1)
        q_logits = torch.stack(aux_inputs["q_logits"], dim=2)  # type: ignore[arg-type]  # B, N, L, h, w
        prob = torch.sigmoid(q_logits.float())
        if selector is not None:
            prob = prob * selector.float().unsqueeze(2)
        out["q_logits"] = soft_aggregate(prob, dim=1)
        return out

    def forward(self, *args, **kwargs):
        raise NotImplementedError("S3Network is driven step by step: use model.train_wrapper.ClipTrainer for "
                                  "training and model.inference.InferenceCore for inference")

    def train(self, mode: bool = True) -> S3Network:
        super().train(mode)
        self.mask_encoder.train(mode)  # keeps its BatchNorm statistics frozen
        if self.cfg.encoder_type.startswith("resnet"):  # Cutie freezes its ResNet's BatchNorm statistics too
            for m in self.pixel_encoder.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


def check_weight_files(cfg: ModelConfig, set_prefix: str = "") -> None:
    """Every weight file the config reads (the pixel encoder's, the mask encoder's ImageNet ResNet) exists:
    FileNotFoundError naming the config key and what to put there. `set_prefix` is where the user sets the keys
    (`model.overrides.` from a training config), for the hint."""
    check_pixel_encoder_file(cfg.pixel_encoder, set_prefix)
    if cfg.mask_encoder.weights:
        check_weights_file("mask_encoder.weights", cfg.mask_encoder.weights,
                           PIXEL_ENCODER_FILES[cfg.mask_encoder.type],
                           f"set {set_prefix}mask_encoder.weights=null for a random init")


def build_network(cfg: ModelConfig) -> S3Network:
    return S3Network(cfg)
