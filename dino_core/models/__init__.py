"""Networks: backbones, the DINO projection head and the multi-crop wrapper."""

from dino_core.models.backbone import ARCHS, build_backbone, embed_dim_of
from dino_core.models.head import DINOHead
from dino_core.models.multicrop import MultiCropWrapper
from dino_core.models.speed import compile_backbone
from dino_core.models.vit_features import intermediate_features, last_self_attention, patch_tokens

__all__ = [
    "ARCHS",
    "DINOHead",
    "MultiCropWrapper",
    "build_backbone",
    "compile_backbone",
    "embed_dim_of",
    "intermediate_features",
    "last_self_attention",
    "patch_tokens",
]
