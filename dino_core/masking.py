"""Block masks for iBOT's masked-patch prediction, drawn from an explicit ``torch.Generator``.

The block generator is BEiT's (Bao et al., "BEiT: BERT Pre-Training of Image Transformers",
ICLR 2022, Alg. 1): rectangles of random area and log-uniform aspect ratio are added until the
target count is reached, none pushing past it. The batch sampler is dinov2's collate (Oquab et
al. 2024): a fraction of the global crops is masked, their ratios spread evenly over a range.

No global RNG is touched: the state of a run's masks is its generator's ``get_state()``
(``MaskSampler.state_dict``), so a resumed run draws the masks it would have drawn.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class BlockMaskGenerator:
    """BEiT's block masking on an ``(H, W)`` patch grid, with dinov2's settings.

    Args:
        grid: ``(H, W)`` patches.
        min_block_patches: the smallest area drawn for a block (4).
        max_block_patches: the largest (dinov2's training: half the grid, the default).
        min_aspect: the smallest height/width ratio drawn (0.3); log-uniform up to
            ``max_aspect`` (default ``1 / min_aspect``). Rounding h and w to whole patches
            may carry a block slightly beyond the range (area 4 at 0.3 gives 1 x 4).
        max_attempts: draws per block before giving up (10): a mask may then fall a few
            patches short of its target, as BEiT's and dinov2's do.
        fill_exact: top a short mask up with random single patches to the exact target
            (dinov3's ``complete_mask_randomly``).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        min_block_patches: int = 4,
        max_block_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
        fill_exact: bool = False,
    ) -> None:
        self.height, self.width = grid
        self.min_block_patches = min_block_patches
        self.max_block_patches = (
            0.5 * self.height * self.width if max_block_patches is None else max_block_patches
        )
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = max_attempts
        self.fill_exact = fill_exact

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def add_block(self, mask: torch.Tensor, max_new: float, generator: torch.Generator) -> int:
        """Masks one more rectangle in ``mask`` ``(H, W)`` bool (in place), adding at least
        one and at most ``max_new`` patches; returns how many it added (0: all attempts
        failed)."""
        lo_log, hi_log = self.log_aspect
        for _ in range(self.max_attempts):
            u_area, u_aspect, u_top, u_left = torch.rand(
                4, generator=generator, dtype=torch.float64
            ).tolist()
            # a range with max_new below the minimum area is drawn downwards, as random.uniform
            area = self.min_block_patches + (max_new - self.min_block_patches) * u_area
            aspect = math.exp(lo_log + (hi_log - lo_log) * u_aspect)
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            if h < self.height and w < self.width:  # strictly inside, as BEiT
                top = int(u_top * (self.height - h + 1))
                left = int(u_left * (self.width - w + 1))
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_new:
                    window.fill_(True)
                    return new
        return 0

    def __call__(self, n_patches: int, generator: torch.Generator) -> torch.Tensor:
        """An ``(H, W)`` bool mask of at most ``n_patches`` patches (exactly, with
        ``fill_exact``), built block by block."""
        if not 0 <= n_patches <= self.num_patches:
            raise ValueError(f"n_patches must be in [0, {self.num_patches}], got {n_patches}")
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < n_patches:
            added = self.add_block(mask, min(n_patches - count, self.max_block_patches), generator)
            if added == 0:
                break
            count += added
        if self.fill_exact and count < n_patches:
            free = (~mask).flatten().nonzero().flatten()
            pick = free[torch.randperm(free.numel(), generator=generator)[: n_patches - count]]
            mask.view(-1)[pick] = True
        return mask


def mask_ratio_bins(n_masked: int, ratio_min_max: tuple[float, float]) -> list[float]:
    """The ``n_masked + 1`` evenly spaced edges over which dinov2's collate spreads the
    ratios of the masked crops (its ``torch.linspace(*mask_ratio_tuple, n + 1)``)."""
    lo, hi = ratio_min_max
    return [lo + (hi - lo) * i / max(n_masked, 1) for i in range(n_masked + 1)]


def sample_batch_masks(
    n_images: int,
    blocks: BlockMaskGenerator,
    generator: torch.Generator,
    mask_sample_probability: float = 0.5,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """The masks of one batch of global crops, as dinov2's collate draws them.

    ``int(n_images * p)`` crops are masked; the i-th of them gets the target
    ``int(N * u)``, ``u`` uniform in the i-th of ``n`` equal bins over ``mask_ratio_min_max``
    (so a batch always spans the whole range); the others get none. The order is shuffled.

    Args:
        n_images: crops in the batch (dinov2: both global crops of every image, n_global * B).
        blocks: the block generator of the patch grid (N = H * W patches).
        generator: the source of every random draw.
        mask_sample_probability: the fraction of crops masked (0.5).
        mask_ratio_min_max: the range of the masked crops' ratios ((0.1, 0.5)).

    Returns:
        ``(n_images, N)`` bool, True at a masked patch (raster order).
    """
    n_masked = int(n_images * mask_sample_probability)
    edges = mask_ratio_bins(n_masked, mask_ratio_min_max)
    n = blocks.num_patches
    masks = torch.zeros(n_images, n, dtype=torch.bool)
    ratios = torch.rand(n_masked, generator=generator, dtype=torch.float64).tolist()
    for i, u in enumerate(ratios):
        target = int(n * (edges[i] + (edges[i + 1] - edges[i]) * u))
        masks[i] = blocks(target, generator).flatten()
    return masks[torch.randperm(n_images, generator=generator)]


class MaskSampler:
    """``sample_batch_masks`` with a generator of its own, whose state is checkpointed.

    Args:
        grid: ``(H, W)`` patches of a global crop.
        seed: seeds the generator.
        mask_sample_probability, mask_ratio_min_max: see ``sample_batch_masks``.
        blocks: the block generator (default: ``BlockMaskGenerator(grid)``).
    """

    def __init__(
        self,
        grid: tuple[int, int],
        seed: int = 0,
        mask_sample_probability: float = 0.5,
        mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
        blocks: BlockMaskGenerator | None = None,
    ) -> None:
        lo, hi = mask_ratio_min_max
        if not 0 <= lo < hi <= 1:
            raise ValueError(
                f"need 0 <= min < max <= 1, got mask_ratio_min_max={mask_ratio_min_max}"
            )
        if not 0 <= mask_sample_probability <= 1:
            raise ValueError(
                f"mask_sample_probability must be in [0, 1], got {mask_sample_probability}"
            )
        self.blocks = BlockMaskGenerator(grid) if blocks is None else blocks
        self.mask_sample_probability = mask_sample_probability
        self.mask_ratio_min_max = mask_ratio_min_max
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, n_images: int) -> torch.Tensor:
        """``(n_images, H * W)`` bool masks of the next batch."""
        return sample_batch_masks(
            n_images, self.blocks, self.generator, self.mask_sample_probability,
            self.mask_ratio_min_max,
        )  # fmt: skip

    def upper_bound(self, n_images: int) -> int:
        """The most patches a batch of ``n_images`` crops can mask (dinov2's ``upperbound``,
        the size of a static buffer of masked patches)."""
        n_masked = int(n_images * self.mask_sample_probability)
        edges = mask_ratio_bins(n_masked, self.mask_ratio_min_max)
        return sum(int(self.blocks.num_patches * e) for e in edges[1:])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
