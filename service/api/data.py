"""``pack``: a folder or URL of images packed into WebDataset shards for training at scale."""

from __future__ import annotations

from collections.abc import Callable

from service.config import load_config
from service.data.pack import PackResult
from service.errors import ConfigError


def pack(src: str, dest: str, shard_mb: float = 256, *, address: str | None = None,
         num_cpus: int | None = None, in_process: bool = False,
         progress: Callable[[str], None] | None = print) -> PackResult:
    """Packs the images under ``src`` into shards of about ``shard_mb`` under ``dest``: one
    Ray task a shard on the cluster at ``address`` (else RAY_ADDRESS, else a local Ray of
    ``num_cpus``), or in this process. Calling it again finishes an interrupted pack (a
    Ctrl-C raises ``PackInterrupted`` saying so)."""
    from service.data.pack import pack as pack_images

    if shard_mb <= 0:
        raise ConfigError(f"--shard-mb must be positive, got {shard_mb:g}")
    cfg = load_config(overrides=[f"ray.address={address}"] if address else [])
    if not in_process and cfg.ray.address:
        from service.train.driver import init_ray

        init_ray(cfg)  # else pack_images() starts a local Ray of its own, without a dashboard
    return pack_images(src, dest, int(shard_mb * 2**20), parallel=not in_process,
                       progress=progress, num_cpus=num_cpus)
