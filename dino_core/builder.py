"""Student and teacher networks of one run."""

from __future__ import annotations

from torch import nn

from dino_core.models import DINOHead, MultiCropWrapper, build_backbone, embed_dim_of
from dino_core.specs import NetworkSpec


def backbone_of(spec: NetworkSpec, drop_path_rate: float) -> nn.Module:
    """The backbone of ``spec`` (arch, patch, image size, depth, position resize)."""
    return build_backbone(
        spec.arch, spec.patch_size, spec.img_size, drop_path_rate, spec.depth,
        pos_embed_interpolation=spec.pos_embed_interpolation,  # type: ignore[arg-type]
    )


def head_of(spec: NetworkSpec, in_dim: int) -> DINOHead:
    """A DINO head of ``spec``'s shape (K = ``spec.out_dim``) on ``in_dim`` features."""
    return DINOHead(in_dim, spec.out_dim, use_bn=spec.use_bn_in_head,
                    norm_last_layer=spec.norm_last_layer, nlayers=spec.head_nlayers,
                    hidden_dim=spec.head_hidden_dim, bottleneck_dim=spec.head_bottleneck_dim)


def build_networks(spec: NetworkSpec) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Returns (student, teacher): same architecture, the teacher without stochastic depth,
    starting from the student's weights and never receiving gradients. With
    ``spec.mask_token`` / ``spec.ibot_separate_head`` both carry iBOT's mask token and head."""

    def one(drop_path_rate: float) -> MultiCropWrapper:
        backbone = backbone_of(spec, drop_path_rate)
        head = head_of(spec, embed_dim_of(backbone))
        # dinov2 gives the separate iBOT head the DINO head's shape
        ibot_head = head_of(spec, embed_dim_of(backbone)) if spec.ibot_separate_head else None
        return MultiCropWrapper(backbone, head, mask_token=spec.mask_token, ibot_head=ibot_head)

    student = one(spec.drop_path_rate)
    teacher = one(0.0)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def ema_parameter_lists(
    teacher: nn.Module, student: nn.Module
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matched (teacher, student) parameter lists for ``ema_update``; pass the unwrapped
    student. Parameters are matched by name so a wrapper's ordering cannot mix them up."""
    s = dict(student.named_parameters())
    names = [n for n, _ in teacher.named_parameters()]
    missing = [n for n in names if n not in s]
    if missing:
        raise ValueError(f"student lacks teacher parameters: {missing[:5]}")
    return [p for _, p in teacher.named_parameters()], [s[n] for n in names]
