"""The DINO projection head (Caron et al. 2021, Sec. 3.1 and Appendix)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP ``d -> hidden -> hidden -> bottleneck``, l2-normalised, then a weight-normalised
    linear layer to ``out_dim`` (K) prototypes without bias.

    With ``norm_last_layer`` the weight-norm magnitude ``g`` is fixed to 1, so every prototype
    has unit norm; the paper notes this stabilises training of ViT-S (Appendix D).

    Args:
        in_dim: backbone feature width.
        out_dim: K, the number of prototypes (65536 in the paper).
        use_bn: BatchNorm after the hidden linear layers (off for ViTs, on in the ResNet runs).
        norm_last_layer: freeze ``g`` at 1.
        nlayers: linear layers before the bottleneck (3 in the paper).
        hidden_dim: width of the hidden layers (2048).
        bottleneck_dim: width of the l2-normalised bottleneck (256).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps features ``(N, in_dim)`` to prototype scores ``(N, out_dim)``."""
        return self.last_layer(self.bottleneck(x))

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The head without its last layer: features ``(N, in_dim)`` to the l2-normalised
        bottleneck ``z`` ``(N, bottleneck_dim)``; ``last_layer(bottleneck(x)) == forward(x)``.

        A fused loss (``dino_core.losses.dino_chunked``) takes ``z`` and ``last_layer_weight()`` and
        never builds the ``(N, out_dim)`` scores.
        """
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def last_layer_weight(self) -> torch.Tensor:
        """The effective last-layer weight ``g * v / ||v||`` ``(out_dim, bottleneck_dim)``.

        Recomputed from the weight-norm parametrization on every call and differentiable
        w.r.t. ``v`` (and ``g`` unless ``norm_last_layer``), as inside ``last_layer``.
        """
        return self.last_layer.weight


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
