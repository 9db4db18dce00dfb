"""Evaluations of a pretrained backbone: features, k-NN, linear probe, attention maps, image
retrieval and copy detection."""

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
from dino_core.eval.copydetect import Whitening, copy_descriptor, copy_detection_map
from dino_core.eval.features import extract_features
from dino_core.eval.linear import (
    LinearClassifier,
    linear_train_transform,
    probe_features,
    train_linear,
)
from dino_core.eval.pca import pca_rgb
from dino_core.eval.ranking import compute_map, revisited_map
from dino_core.eval.retrieval import evaluate_retrieval, multi_scale_features
from dino_core.eval.video import segment_video, vit_frame_features
from dino_core.eval.video_metrics import boundary_f, region_jaccard, video_scores

__all__ = [
    "LinearClassifier",
    "Whitening",
    "attention_grid",
    "attention_maps",
    "attention_masks",
    "boundary_f",
    "cls_attention",
    "compute_map",
    "copy_descriptor",
    "copy_detection_map",
    "evaluate_retrieval",
    "extract_features",
    "heatmap_overlay",
    "jaccard",
    "linear_train_transform",
    "mask_jaccard_over_dataset",
    "multi_scale_features",
    "pca_rgb",
    "prepare_image",
    "probe_features",
    "region_jaccard",
    "revisited_map",
    "segment_video",
    "train_linear",
    "video_scores",
    "vit_frame_features",
]
