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

# Every architecture the config allows, at the paper's patch sizes and others it accepts.
CASES = [(arch, patch, 1) for arch in ("vit_tiny", "vit_small", "vit_base")
         for patch in (4, 8, 14, 16, 32)] + [("resnet50", 16, None)]


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

    missing = model.load_state_dict(load_file(str(path)), strict=True)
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

    assert {a for a, _, _ in CASES} == set(typing.get_args(ModelConfig.model_fields["arch"].annotation))
