"""Evaluations of a pretrained backbone: features, k-NN, linear probe, attention maps."""

from dino_core.eval.attention import (
    attention_grid,
    attention_maps,
    attention_masks,
    cls_attention,
    heatmap_overlay,
    jaccard,
    mask_jaccard_over_dataset,
    prepare_image,
)
from dino_core.eval.features import extract_features
from dino_core.eval.linear import (
    LinearClassifier,
    linear_train_transform,
    probe_features,
    train_linear,
)
from dino_core.eval.pca import pca_rgb

__all__ = [
    "LinearClassifier",
    "attention_grid",
    "attention_maps",
    "attention_masks",
    "cls_attention",
    "extract_features",
    "heatmap_overlay",
    "jaccard",
    "linear_train_transform",
    "mask_jaccard_over_dataset",
    "pca_rgb",
    "prepare_image",
    "probe_features",
    "train_linear",
]
