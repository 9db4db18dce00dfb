"""The exported teacher backbone is a timm state dict that loads with strict=True."""

import json

import pytest
import timm
import torch

from dino_core import NetworkSpec, build_networks
from dino_core.interop.export import (
    backbone_state_from_checkpoint,
    load_backbone,
    read_metadata,
    save_backbone,
)
from dino_core.models.families import FAMILY_ARCHS

# Every architecture the config allows, at the paper's patch sizes and others it accepts;
# of Meta's DINOv2 / DINOv3 archs the small ones (plain, registers, RoPE): the larger ones are
# the same modules at other widths, whose timm shapes tests/test_families.py checks (the
# meta device: building ViT-g for real here would cost ~20 s of the suite).
META_CASES = [("dinov2_vits14", 14, 1), ("dinov2_vits14_reg4", 14, 1), ("dinov3_vits16", 16, 1)]
CASES = [(arch, patch, 1) for arch in ("vit_tiny", "vit_small", "vit_base")
         for patch in (4, 8, 14, 16, 32)] + [("resnet50", 16, None)] + META_CASES


@pytest.mark.parametrize("arch, patch, depth", CASES)
def test_export_loads_into_timm_strict_with_same_features(tmp_path, arch, patch, depth):
    """The README's recipe: ``timm.create_model(name, num_classes=0, **kwargs)`` with the
    file's metadata, then ``load_state_dict(strict=True)``, gives the same features."""
    side = 64 if arch == "resnet50" else 4 * patch  # timm wants sides divisible by the patch
    spec = NetworkSpec(arch=arch, patch_size=patch, img_size=side, depth=depth, out_dim=32,
                       head_hidden_dim=16, head_bottleneck_dim=8)
    student, teacher = build_networks(spec)
    with torch.no_grad():  # make the teacher differ from a fresh init
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    state = {"teacher": teacher.state_dict(), "student": student.state_dict()}
    meta_cfg = {"arch": arch, "patch_size": patch, "depth": depth, "img_size": side}
    path = save_backbone(tmp_path / "b.safetensors", backbone_state_from_checkpoint(state), meta_cfg)

    meta = read_metadata(path)
    model = timm.create_model(meta["timm_name"], pretrained=False, num_classes=0,
                              **json.loads(meta["timm_kwargs"]))
    from safetensors.torch import load_file

    weights = load_file(str(path))
    if "rope.periods" in weights:  # DINOv3: Meta's periods, which timm's model recomputes
        model.rope.periods.copy_(weights.pop("rope.periods"))
    missing = model.load_state_dict(weights, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    model.eval()
    teacher.backbone.eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert torch.allclose(model(x), teacher.backbone(x), atol=1e-5)
        assert torch.allclose(load_backbone(path)(x), teacher.backbone(x), atol=1e-5)


def test_load_backbone_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a DINO backbone file"):
        load_backbone(tmp_path / "x.safetensors")


def test_the_export_cases_cover_every_architecture_the_config_allows():
    import typing

    from service.config.schema import ModelConfig

    allowed = set(typing.get_args(ModelConfig.model_fields["arch"].annotation))
    assert {a for a, _, _ in CASES} | set(FAMILY_ARCHS) == allowed
