"""Distillation from a frozen teacher (issue 24), in process: the teacher never moves and
gets no gradient, the losses against naive computations written here (loops over images,
patches and views) with a wrong formula shown to differ, the grid resampling for every pair
of tested patch sizes, and a patch-16 student learning from a patch-8 teacher.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dino_core.builder import ema_parameter_lists
from dino_core.distill import (
    DistillObjective,
    DistillStudent,
    FrozenTeacher,
    backbone_features,
    load_teacher,
    parameter_sha256,
    resample_patches,
    train_step_distill,
)
from dino_core.distill.student import ema_copy
from dino_core.interop.export import save_backbone
from dino_core.losses.dino_distill import DINODistillLoss
from dino_core.losses.feature_distill import FeatureDistillLoss, feature_distill_loss
from dino_core.models import DINOHead, build_backbone
from dino_core.optim import build_optimizer
from dino_core.step import StepConfig

PATCH_SIZES = (8, 14, 16)
VALUES = {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.9, "teacher_temp": 0.04}


def _vit(patch: int, seed: int, img_size: int = 32):
    torch.manual_seed(seed)
    return build_backbone("vit_tiny", patch, img_size, depth=1)


def _head(seed: int, k: int = 16) -> DINOHead:
    torch.manual_seed(seed)
    return DINOHead(192, k, nlayers=2, hidden_dim=32, bottleneck_dim=8)


def _crops(seed: int, b: int = 4, n_local: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)]
            + [torch.randn(b, 3, 16, 16, generator=g) for _ in range(n_local)])


# --- the frozen teacher ----------------------------------------------------------------------


def test_the_teacher_gets_no_gradient_and_never_changes(one_torch_thread):
    teacher = FrozenTeacher(_vit(8, 0), _head(1))
    student = DistillStudent(_vit(16, 2), teacher.embed_dim, hidden_dim=32, head=_head(3))
    objective = DistillObjective(FeatureDistillLoss(1.0, 0.5), DINODistillLoss(16), 0.5)
    ema = ema_copy(student)
    optimizer = build_optimizer(student)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher.parameters()}
    before = parameter_sha256(teacher)
    student_before = [p.detach().clone() for p in student.parameters()]
    ema_before = [p.detach().clone() for p in ema.parameters()]
    student.train()
    teacher.train()  # a caller's train() cannot undo the freeze
    for step in range(5):
        out = train_step_distill(
            student=student, teacher=teacher, objective=objective, optimizer=optimizer,
            crops=_crops(step, n_local=2), values=VALUES, step=step, cfg=StepConfig(),
            ema_params=ema_parameter_lists(ema, student),
        )
        assert math.isfinite(out.loss) and {"loss_feat_cls", "loss_feat_patch",
                                            "loss_dino"} <= set(out.stats)
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert parameter_sha256(teacher) == before == teacher.sha256()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(student_before, student.parameters())
               if p.grad is not None)
    assert sum(not torch.equal(a, p) for a, p in zip(student_before, student.parameters())) > 10
    assert any(not torch.equal(a, p) for a, p in zip(ema_before, ema.parameters()))
    assert not torch.equal(objective.dino.center, torch.zeros_like(objective.dino.center))


def test_the_hash_sees_one_changed_value_and_the_buffers():
    vit = _vit(16, 0)
    digest = parameter_sha256(vit)
    assert digest == parameter_sha256(_vit(16, 0)) and len(digest) == 64
    with torch.no_grad():
        vit.blocks[0].mlp.fc1.weight[3, 5] += 1e-6
    assert parameter_sha256(vit) != digest
    net = build_backbone("resnet50")
    digest = parameter_sha256(net)
    with torch.no_grad():
        net.bn1.running_mean[0] += 1.0  # a buffer, not a parameter
    assert parameter_sha256(net) != digest


def test_a_teacher_file_is_read_by_the_existing_loader(tmp_path):
    vit = _vit(8, 5)
    path = save_backbone(tmp_path / "t.safetensors", vit.state_dict(),
                         {"arch": "vit_tiny", "patch_size": 8, "depth": 1, "img_size": 32})
    teacher = load_teacher(path)
    assert parameter_sha256(teacher.backbone) == parameter_sha256(vit)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_a_resnet_gives_its_pooled_feature_and_its_last_map_as_the_patch_grid():
    net = build_backbone("resnet50").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = backbone_features(net, x)
        assert torch.allclose(tokens.cls, net(x), atol=1e-5)
        assert tokens.grid == (2, 2) and tokens.patches.shape == (2, 4, 2048)
        assert torch.allclose(tokens.patches.mean(1), tokens.cls, atol=1e-5)
    with pytest.raises(TypeError, match="timm ViT or a torchvision ResNet"):
        backbone_features(torch.nn.Linear(3, 3), x)


@pytest.mark.parametrize("student_arch", ["vit", "resnet50"])
def test_a_resnet_teacher_feeds_a_vit_and_a_resnet_student(one_torch_thread, student_arch):
    """The ResNet's 2 x 2 map (64 px) is resampled to a ViT/16's 4 x 4 grid, or matches the
    ResNet student's own; the 2048-wide targets come through the projectors."""
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_backbone("resnet50"))
    backbone = _vit(16, 1, 64) if student_arch == "vit" else build_backbone("resnet50")
    student = DistillStudent(backbone, teacher.embed_dim)
    objective = DistillObjective(FeatureDistillLoss(1.0, 1.0, "smooth_l1"))
    before = teacher.sha256()
    crops = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    with torch.no_grad():
        s = student(crops)
    assert s.patches.shape == ((4, 16, 2048) if student_arch == "vit" else (4, 4, 2048))
    out = train_step_distill(student=student, teacher=teacher, objective=objective,
                             optimizer=build_optimizer(student), crops=crops, values=VALUES,
                             step=0, cfg=StepConfig())
    assert math.isfinite(out.loss) and teacher.sha256() == before


# --- the losses against naive computations ---------------------------------------------------


def _naive_layer_norm(v: list[float], eps: float = 1e-6) -> list[float]:
    mean = sum(v) / len(v)
    var = sum((a - mean) ** 2 for a in v) / len(v)
    return [(a - mean) / math.sqrt(var + eps) for a in v]


def _naive_token_loss(p: list[float], t: list[float], kind: str, normalise: bool = True) -> float:
    t = _naive_layer_norm(t) if normalise else t
    if kind == "cosine":
        dot = sum(a * b for a, b in zip(p, t))
        return 1.0 - dot / (math.sqrt(sum(a * a for a in p)) * math.sqrt(sum(b * b for b in t)))
    d = [a - b for a, b in zip(p, t)]
    return sum(0.5 * x * x if abs(x) < 1.0 else abs(x) - 0.5 for x in d) / len(d)


def _naive_feature_loss(pred_cls, pred_patches, t_cls, t_patches, kind, w_cls, w_patch,
                        normalise=True):
    """Loops over images (CLS) and over images and patches."""
    b, n = pred_patches.shape[:2]
    cls = sum(_naive_token_loss(pred_cls[i].tolist(), t_cls[i].tolist(), kind, normalise)
              for i in range(b)) / b
    patch = sum(_naive_token_loss(pred_patches[i, j].tolist(), t_patches[i, j].tolist(), kind,
                                  normalise) for i in range(b) for j in range(n)) / (b * n)
    return w_cls * cls + w_patch * patch


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1"])
def test_the_feature_loss_equals_a_naive_computation(kind):
    g = torch.Generator().manual_seed(0)
    # teachers off-centre and of a large scale, as real ones are, and a student close to the
    # normalised target: the normalisation then decides the value
    t_cls = 30.0 + 5.0 * torch.randn(3, 24, generator=g)
    t_patches = 30.0 + 5.0 * torch.randn(3, 5, 24, generator=g)
    pred_cls = F.layer_norm(t_cls, (24,)) + 0.5 * torch.randn(3, 24, generator=g)
    pred_patches = F.layer_norm(t_patches, (24,)) + 0.5 * torch.randn(3, 5, 24, generator=g)
    terms = FeatureDistillLoss(0.7, 0.3, kind)(pred_cls, pred_patches, t_cls, t_patches)
    got = float(terms["feat_cls"] + terms["feat_patch"])
    want = _naive_feature_loss(pred_cls, pred_patches, t_cls, t_patches, kind, 0.7, 0.3)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    # the mutation: the same formula without normalising the teacher gives another value
    wrong = _naive_feature_loss(pred_cls, pred_patches, t_cls, t_patches, kind, 0.7, 0.3,
                                normalise=False)
    assert abs(wrong - got) > 0.5
    only_patch = FeatureDistillLoss(0.0, 1.0, kind)(None, pred_patches, t_cls, t_patches)
    assert set(only_patch) == {"feat_patch"}
    assert float(only_patch["feat_patch"]) == pytest.approx(
        float(feature_distill_loss(pred_patches, t_patches, kind)), rel=1e-6)


def test_the_feature_loss_is_zero_for_the_target_and_rejects_bad_settings():
    t = 3.0 + 7.0 * torch.randn(4, 6, 32)
    target = F.layer_norm(t, (32,), eps=1e-6)
    for kind in ("cosine", "smooth_l1"):
        assert float(feature_distill_loss(target, t, kind)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="cosine"):
        FeatureDistillLoss(loss="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both 0"):
        FeatureDistillLoss(0.0, 0.0)
    with pytest.raises(ValueError, match="no prediction"):
        FeatureDistillLoss(1.0, 1.0)(torch.randn(4, 32), None, t[:, 0], t)


def _naive_dino_distill(s_out, t_out, center, t_temp, s_temp, n_global, ignore_diagonal,
                        centred=True):
    """Loops over (teacher view, student view) pairs and images."""
    b = t_out.shape[0] // n_global
    n_crops = s_out.shape[0] // b
    total, pairs = 0.0, 0
    for q in range(n_global):
        for v in range(n_crops):
            if ignore_diagonal and v == q:
                continue
            pair = 0.0
            for i in range(b):
                shift = center[0] if centred else 0.0
                p = torch.softmax((t_out[q * b + i].double() - shift) / t_temp, -1)
                logp = torch.log_softmax(s_out[v * b + i].double() / s_temp, -1)
                pair -= float((p * logp).sum())
            total += pair / b
            pairs += 1
    return total / pairs


@pytest.mark.parametrize(("ignore_diagonal", "n_local"), [(True, 2), (False, 2), (False, 0)])
def test_the_dino_distillation_loss_equals_a_naive_computation(ignore_diagonal, n_local):
    g = torch.Generator().manual_seed(1)
    b, k = 3, 10
    s_out = torch.randn((2 + n_local) * b, k, generator=g)
    t_out = 3.0 * torch.randn(2 * b, k, generator=g)
    loss = DINODistillLoss(k, student_temp=0.1, ignore_diagonal=ignore_diagonal)
    loss.center.copy_(torch.randn(1, k, generator=g))
    center = loss.center.clone()
    got = float(loss(s_out, t_out, 0.05))
    want = _naive_dino_distill(s_out, t_out, center, 0.05, 0.1, 2, ignore_diagonal)
    assert got == pytest.approx(want, rel=1e-5)
    wrong = _naive_dino_distill(s_out, t_out, center, 0.05, 0.1, 2, ignore_diagonal, centred=False)
    assert abs(wrong - got) > 0.05  # the mutation: no centring
    loss.update_center(t_out)
    assert torch.allclose(loss.center, 0.9 * center + 0.1 * t_out.mean(0, keepdim=True))


# --- the grid resampling ---------------------------------------------------------------------


def _naive_bilinear(grid: torch.Tensor, h2: int, w2: int) -> torch.Tensor:
    """``(h, w, D)`` to ``(h2, w2, D)``: cell centres, source coordinates clamped at 0."""
    h, w = grid.shape[:2]

    def source(i: int, n: int, n2: int) -> tuple[int, int, float]:
        x = max((i + 0.5) * n / n2 - 0.5, 0.0)
        lo = min(int(math.floor(x)), n - 1)
        return lo, min(lo + 1, n - 1), x - lo

    out = torch.empty(h2, w2, grid.shape[-1], dtype=grid.dtype)
    for i in range(h2):
        y0, y1, fy = source(i, h, h2)
        for j in range(w2):
            x0, x1, fx = source(j, w, w2)
            out[i, j] = ((1 - fy) * ((1 - fx) * grid[y0, x0] + fx * grid[y0, x1])
                         + fy * ((1 - fx) * grid[y1, x0] + fx * grid[y1, x1]))
    return out


@pytest.mark.parametrize("student_patch", PATCH_SIZES)
@pytest.mark.parametrize("teacher_patch", PATCH_SIZES)
def test_the_grid_resampling_for_every_pair_of_patch_sizes(teacher_patch, student_patch):
    size = 112  # grids 14, 8 and 7
    t_grid, s_grid = (size // teacher_patch,) * 2, (size // student_patch,) * 2
    g = torch.Generator().manual_seed(teacher_patch * 100 + student_patch)
    patches = torch.randn(2, t_grid[0] * t_grid[1], 5, generator=g, dtype=torch.float64)
    got = resample_patches(patches, t_grid, s_grid)
    assert got.shape == (2, s_grid[0] * s_grid[1], 5)
    for b in range(2):
        want = _naive_bilinear(patches[b].reshape(*t_grid, 5), *s_grid)
        assert torch.allclose(got[b], want.reshape(-1, 5), atol=1e-12)
    if t_grid == s_grid:
        assert got is patches


def test_the_grids_of_real_backbones_at_112_px(one_torch_thread):
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        grids = {p: backbone_features(_vit(p, 0, 112), x) for p in PATCH_SIZES}
    assert {p: t.grid for p, t in grids.items()} == {8: (14, 14), 14: (8, 8), 16: (7, 7)}
    assert all(t.patches.shape == (1, t.grid[0] * t.grid[1], 192) for t in grids.values())
    with pytest.raises(ValueError, match="do not fill"):
        resample_patches(torch.randn(1, 10, 3), (3, 3), (2, 2))


# --- learning --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cosine", "smooth_l1"])
def test_a_patch_16_student_learns_from_a_patch_8_teacher(one_torch_thread, kind):
    teacher = FrozenTeacher(_vit(8, 0))
    student = DistillStudent(_vit(16, 1), teacher.embed_dim)
    objective = DistillObjective(FeatureDistillLoss(1.0, 1.0, kind))
    optimizer = build_optimizer(student)
    crops = _crops(7, b=8)
    losses = [train_step_distill(student=student, teacher=teacher, objective=objective,
                                 optimizer=optimizer, crops=crops, values=VALUES, step=i,
                                 cfg=StepConfig()).loss for i in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses
