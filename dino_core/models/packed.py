"""One backbone call for all crops of a multi-crop batch: per-crop token sequences packed
side by side, with block-diagonal attention so no crop sees another.

``MultiCropWrapper`` calls the ViT once per resolution (2 x 197 and 10 x 37 tokens for
ViT-S/16 at 224/96 px), so the local crops run on small matmuls. Here each crop is embedded
exactly as the backbone embeds it (``patch_embed`` and ``_pos_embed``, whose
``dynamic_img_size`` code resamples the position table to the crop's grid, once per
resolution), one image's sequences are laid side by side in a few equal-length rows, and the
blocks run once on ``(rows, L, D)`` with attention masked to each crop's own tokens.

Rows: the crops are split into the most groups of equal token count that the longest-first
greedy (Graham's LPT rule) finds: 197 + 197 + 10 x 37 tokens give two rows of 382 per image,
one global and five local crops each (about 11% more FLOPs than the per-resolution calls under
a dense mask, against 27% for one row of 764); two global crops alone give two unmasked rows,
the per-resolution call itself. FlexAttention skips the masked tiles.

Stochastic depth stays per crop (timm's ``DropPath`` keeps or drops a whole sample, and each
crop is a sample): the keep flags are drawn before the blocks run, in the order and shapes the
per-resolution calls draw them, and spread over each crop's tokens, so from the same RNG state
both paths drop the same branches (in fp32; under autocast the flags are drawn in the
residual's dtype, not the branch's, so the random stream differs but not the semantics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from dino_core.models.multicrop import MultiCropWrapper, _runs_of_equal_size

ATTENTIONS = ("auto", "sdpa", "flex")
Attend = Callable[[Any, torch.Tensor], torch.Tensor]  # (timm Attention, tokens) -> tokens


@dataclass(frozen=True)
class _Layout:
    """Where each crop's tokens sit: crop ``i`` lies in row group ``crop_group[i]`` and starts
    (with its CLS token) at ``crop_offset[i]``; every group's rows are equally long."""

    counts: tuple[int, ...]  # tokens per crop, in crop order
    groups: tuple[tuple[int, ...], ...]  # crop indices of each row group, ascending

    @property
    def crop_group(self) -> list[int]:
        where = {i: g for g, members in enumerate(self.groups) for i in members}
        return [where[i] for i in range(len(self.counts))]

    @property
    def crop_offset(self) -> list[int]:
        offsets = [0] * len(self.counts)
        for members in self.groups:
            pos = 0
            for i in members:
                offsets[i], pos = pos, pos + self.counts[i]
        return offsets

    def token_crop(self) -> torch.Tensor:
        """``(k, L)``: the crop index of every token of every row group."""
        rows = [[i for i in members for _ in range(self.counts[i])] for members in self.groups]
        return torch.tensor(rows, dtype=torch.long)

    def token_segment(self) -> torch.Tensor:
        """``(k, L)``: the position of every token's crop within its row (0, 1, ...)."""
        rows = [[s for s, i in enumerate(m) for _ in range(self.counts[i])] for m in self.groups]
        return torch.tensor(rows, dtype=torch.long)


def _balanced_groups(counts: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """The most groups of equal token sums the longest-first greedy finds (1 always works)."""
    total = sum(counts)
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    for k in range(len(counts), 1, -1):
        if total % k:
            continue
        sums: list[int] = [0] * k
        members: list[list[int]] = [[] for _ in range(k)]
        for i in order:
            g = min(range(k), key=sums.__getitem__)
            sums[g] += counts[i]
            members[g].append(i)
        if len(set(sums)) == 1:
            return tuple(tuple(sorted(m)) for m in sorted(members, key=min))
    return (tuple(range(len(counts))),)


def supports_packing(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a timm ViT whose blocks this module can run packed: CLS-token
    pooling, stock ``Block``/``Attention`` (no gate, no attention dropout), no patch dropout."""
    if not isinstance(backbone, VisionTransformer):
        return False
    if backbone.global_pool != "token" or backbone.attn_pool is not None:
        return False
    if not isinstance(backbone.patch_drop, nn.Identity):
        return False
    blk: Any  # timm's blocks are an untyped Sequential
    for blk in backbone.blocks:
        if type(blk) is not Block or type(blk.attn) is not Attention:
            return False
        if getattr(blk.attn, "gate", None) is not None or blk.attn.attn_drop.p > 0:
            return False
    return True


def _embed(vit: VisionTransformer, runs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-crop tokens ``(B, n_i, D)``, computed as ``forward_features`` does, one call per
    resolution (so the position table is resampled once per grid)."""
    tokens: list[torch.Tensor] = []
    for run in runs:
        x = vit.patch_embed(torch.cat(run))
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        tokens.extend(x.chunk(len(run)))
    return tokens


def _drop_path_scales(
    vit: VisionTransformer, run_lengths: list[int], batch: int, like: torch.Tensor
) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per block, the (attention, MLP) branch scales ``(n_crops, B)`` or None where the path
    is never dropped, drawn in the order and shapes of the per-resolution calls."""
    draws: list[list[list[torch.Tensor]]] = [[[], []] for _ in vit.blocks]
    active = False
    blk: Any
    for n_run in run_lengths:
        for j, blk in enumerate(vit.blocks):
            for b, dp in enumerate((blk.drop_path1, blk.drop_path2)):
                p = getattr(dp, "drop_prob", 0.0)
                if p == 0.0 or not dp.training:
                    continue
                active = True
                keep = 1.0 - p
                flags = like.new_empty((n_run * batch, 1, 1)).bernoulli_(keep)
                if keep > 0.0 and dp.scale_by_keep:
                    flags.div_(keep)
                draws[j][b].append(flags.view(n_run, batch))
    if not active:
        return [(None, None) for _ in vit.blocks]
    return [tuple(torch.cat(d) if d else None for d in pair) for pair in draws]  # type: ignore[misc]


def _per_token(scale: torch.Tensor | None, token_crop: torch.Tensor) -> torch.Tensor | None:
    """``(n_crops, B)`` -> ``(k * B, L, 1)`` for rows laid out group-major."""
    if scale is None:
        return None
    k, length = token_crop.shape
    return scale[token_crop].permute(0, 2, 1).reshape(k * scale.shape[1], length, 1)


def _block_diagonal_mask(layout: _Layout, batch: int, device: torch.device) -> torch.Tensor | None:
    """Boolean SDPA mask (True = attend): ``(1, 1, L, L)`` when every row group has the same
    segment pattern, else ``(k * B, 1, L, L)``; None when every row holds one crop."""
    if all(len(m) == 1 for m in layout.groups):
        return None
    seg = layout.token_segment()
    if bool((seg == seg[:1]).all()):
        seg = seg[:1]
    seg = seg.to(device)
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    return mask if mask.shape[0] == 1 else mask.repeat_interleave(batch, dim=0)


@functools.lru_cache(maxsize=16)
def _flex_block_mask(layout: _Layout, batch: int, device: torch.device):  # -> BlockMask
    from torch.nn.attention.flex_attention import create_block_mask

    seg = layout.token_segment()
    if bool((seg == seg[:1]).all()):
        row = seg[0].to(device)

        def same_crop(b, h, q, kv):  # type: ignore[no-untyped-def]
            return row[q] == row[kv]

        return create_block_mask(same_crop, None, None, row.numel(), row.numel(), device=device)
    rows = seg.repeat_interleave(batch, dim=0).to(device)

    def same_crop_in_row(b, h, q, kv):  # type: ignore[no-untyped-def]
        return rows[b, q] == rows[b, kv]

    n_rows, length = rows.shape
    return create_block_mask(same_crop_in_row, n_rows, None, length, length, device=device)


@functools.cache
def _flex_kernel(device_type: str) -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    # compiled, flex generates a fused kernel that skips masked tiles; eager (CPU, inference
    # only in torch 2.x) materialises the full score matrix, which is fine for a check
    kernel: Any = flex_attention  # an overloaded function: mypy has no single type for it
    return torch.compile(kernel, dynamic=False) if device_type == "cuda" else kernel


def _flex_attend(block_mask) -> Attend:  # type: ignore[no-untyped-def]
    """timm ``Attention.forward`` with ``flex_attention`` in place of SDPA."""

    def attend(attn: Any, x: torch.Tensor) -> torch.Tensor:
        rows, n, _ = x.shape
        qkv = attn.qkv(x).reshape(rows, n, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = _flex_kernel(x.device.type)(q, k, v, block_mask=block_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(rows, n, attn.num_heads * attn.head_dim)
        return attn.proj_drop(attn.proj(attn.norm(out)))

    return attend


def _sdpa_attend(mask: torch.Tensor | None) -> Attend:
    def attend(attn: Any, x: torch.Tensor) -> torch.Tensor:
        return attn(x, attn_mask=mask)

    return attend


def _block(
    blk: Any,
    x: torch.Tensor,
    attend: Attend,
    scale1: torch.Tensor | None,
    scale2: torch.Tensor | None,
) -> torch.Tensor:
    """timm ``Block.forward`` with the drop-path flags given per token."""
    y = blk.ls1(attend(blk.attn, blk.norm1(x)))
    x = x + (y if scale1 is None else y * scale1)
    y = blk.ls2(blk.mlp(blk.norm2(x)))
    return x + (y if scale2 is None else y * scale2)


def _resolve_attention(attention: str, device: torch.device) -> str:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    if attention == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    if attention == "flex" and device.type == "cpu" and torch.is_grad_enabled():
        raise NotImplementedError(
            "FlexAttention has no backward on CPU; use attention='sdpa' (or run under no_grad)"
        )
    return attention


def packed_backbone_forward(
    backbone: nn.Module, crops: list[torch.Tensor] | torch.Tensor, attention: str = "auto"
) -> torch.Tensor:
    """CLS features of all crops from one pass through the transformer blocks.

    Args:
        backbone: a ViT from ``build_backbone``; any other backbone (ResNet-50), or crops of
            unequal batch sizes, run per resolution as in ``MultiCropWrapper``.
        crops: ``(B, 3, H_i, W_i)`` tensors.
        attention: ``"sdpa"`` (boolean block-diagonal mask, any device), ``"flex"``
            (FlexAttention block mask; compiled on CUDA; forward only on CPU) or ``"auto"``
            (flex on CUDA, sdpa elsewhere).

    Returns:
        ``(len(crops) * B, D)``; rows ``[i * B, (i + 1) * B)`` belong to ``crops[i]``, as in
        ``MultiCropWrapper``.
    """
    if isinstance(crops, torch.Tensor):
        crops = [crops]
    runs = _runs_of_equal_size(crops)
    if not supports_packing(backbone) or len({c.shape[0] for c in crops}) != 1:
        return torch.cat([backbone(torch.cat(run)) for run in runs])
    vit: VisionTransformer = backbone  # type: ignore[assignment]
    batch, device = crops[0].shape[0], crops[0].device
    mode = _resolve_attention(attention, device)

    tokens = _embed(vit, runs)
    counts = tuple(t.shape[1] for t in tokens)
    layout = _Layout(counts, _balanced_groups(counts))
    # rows group-major: row g * B + b holds the crops of group g of image b
    x = torch.stack([torch.cat([tokens[i] for i in m], dim=1) for m in layout.groups])
    k, _, length, dim = x.shape
    x = x.reshape(k * batch, length, dim)

    token_crop = layout.token_crop().to(device)
    scales = _drop_path_scales(vit, [len(r) for r in runs], batch, x)
    if mode == "flex" and len(layout.groups) < len(crops):
        attend = _flex_attend(_flex_block_mask(layout, batch, device))
    else:  # rows of one crop each need no mask: plain SDPA, the per-resolution call
        attend = _sdpa_attend(_block_diagonal_mask(layout, batch, device))
    for blk, (s1, s2) in zip(vit.blocks, scales):
        s1, s2 = _per_token(s1, token_crop), _per_token(s2, token_crop)
        if vit.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(_block, blk, x, attend, s1, s2, use_reentrant=False)
        else:
            x = _block(blk, x, attend, s1, s2)

    group = torch.tensor(layout.crop_group, device=device)
    offset = torch.tensor(layout.crop_offset, device=device)
    cls = x.view(k, batch, length, dim)[group, :, offset]  # (n_crops, B, D)
    # the final norm is per token, so normalising only the CLS tokens is the same
    return vit.forward_head(vit.norm(cls.reshape(len(crops) * batch, 1, dim)))


class PackedMultiCropWrapper(MultiCropWrapper):
    """``MultiCropWrapper`` whose backbone runs once on all crops (``packed_backbone_forward``).

    Same parameters and state dict keys (``backbone.*``, ``head.*``), same output rows.
    In the DINOv2 recipe's masked pass (``forward_masked``) the masked global crops run as
    one call of their own and the other crops packed together.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, attention: str = "auto",
                 mask_token: bool = False, ibot_head: nn.Module | None = None) -> None:
        super().__init__(backbone, head, mask_token, ibot_head)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        self.attention = attention

    def features(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The backbone's features of every crop from one packed call, in crop order."""
        return packed_backbone_forward(self.backbone, crops, self.attention)
