"""The MLflow model of a run's backbone, as a models-from-code file: ``log_backbone_model``
(``service.tracking.models``) hands MLflow this file, which copies it into the model, and
every process that loads the model (``mlflow.pyfunc.load_model``, ``mlflow models serve``)
runs it. It imports ``dino_core`` alone of this project: serve the model in an environment
where the project is installed (``--env-manager local``).

Input: float32 images ``(N, 3, H, W)``, RGB scaled to [0, 1] then normalised with ImageNet's
mean and std, as the evaluations' transform gives them (``dino_core.augment.per_image.
eval_transform``: shorter side to ``eval.image_size * 256 / 224``, centre crop to
``eval.image_size``; the model's metadata names the run's size). Any H, W of at least one
patch work (the position table is resampled); the remainder of a side past a multiple of the
patch size is ignored. Output: ``(N, D)`` float32, the l2-normalised CLS features the k-NN
evaluation uses (``dino_core.eval.extract_features``).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
import torch.nn.functional as F
from mlflow.pyfunc import PythonModel

from dino_core.interop.export import load_backbone
from dino_core.models.backbone import embed_dim_of

WEIGHTS = "weights"  # the exported .safetensors file, a key of the model's artifacts
BATCH = 64  # images per forward pass: a large request never needs all its activations at once


class BackboneEmbeddings(PythonModel):
    """Embeddings of normalised images by the run's exported teacher backbone."""

    def load_context(self, context: Any) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_backbone(context.artifacts[WEIGHTS]).eval().to(self.device)
        self.dim = embed_dim_of(self.model)

    @torch.no_grad()
    def predict(self, context: Any, model_input: np.ndarray,
                params: dict | None = None) -> np.ndarray:
        """``model_input`` ``(N, 3, H, W)`` float32 -> ``(N, D)`` float32. (An ndarray hint:
        MLflow infers no schema from it, the logged signature is the schema.)"""
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        out = [F.normalize(self.model(x[i : i + BATCH].to(self.device)).float(), dim=1).cpu()
               for i in range(0, len(x), BATCH)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.dim), np.float32)


mlflow.models.set_model(BackboneEmbeddings())
