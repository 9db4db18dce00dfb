"""Checks of a run that need no cluster, made before Ray starts: the storage root answers, its
bucket exists and it can be written, the data is there and mostly readable, ``train.resume``
is a checkpoint, a run name that is reused has checkpoints of the same model, and a
distillation teacher reads and fits. Each
failure is one error naming the input."""

from __future__ import annotations

import logging

from dino_core.data.folder import load_rgb
from service import data, storage
from service.config import DataSource, DinoConfig, ProceduralSource, network_spec, validate
from service.errors import CheckpointError, ConfigError, DataError
from service.storage import checkpoints as ckpt
from service.train import distill
from service.train.init_from import check_init_from

log = logging.getLogger(__name__)
SAMPLE = 32  # images decoded to judge a folder before training on it


def check_storage(root: str, create_bucket: bool = False) -> None:
    """The root answers, its bucket exists (or is made: ``storage.create_bucket``) and it is
    a folder this process can write to; each failure is a StorageError naming the root."""
    storage.check_bucket(root, create_bucket)
    storage.check_writable(root)


def _sample_unreadable(ds: object, n: int) -> tuple[int, int, str]:
    """(unreadable, sampled, first error) over up to ``n`` evenly spread images."""
    samples = ds.samples  # type: ignore[attr-defined]
    count = len(samples)
    picks = range(count) if count <= n else sorted({i * count // n for i in range(n)})
    bad, first = 0, ""
    for i in picks:
        try:
            load_rgb(ds.open(samples[i][0]), 64)  # type: ignore[attr-defined]
        except Exception as err:  # noqa: BLE001 - decoders raise many types
            bad += 1
            first = first or f"{samples[i][0]}: {type(err).__name__}: {err}"
    return bad, len(picks), first


def check_shards(ds: data.ShardStream, path: str, what: str) -> None:
    """The first and last shards of a packed set are there (each image was decoded when it
    was packed)."""
    m = ds.manifest
    for shard in {m.shards[0], m.shards[-1]}:
        if not storage.exists(m.url(shard)):
            raise DataError(f"{what}={path}: its shard {m.url(shard)} is missing")


def check_images(path: str, source: DataSource, cfg: DinoConfig, what: str,
                 min_images: int = 1) -> None:
    """``path`` holds images, enough of them, and a sample of them decodes."""
    if isinstance(source, ProceduralSource):
        return
    try:
        ds = data.open_images(source, None, 0, 0, cfg)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{what}={path}: {err}") from None
    if isinstance(ds, data.ShardStream):
        check_shards(ds, path, what)
        bad, sampled, first = 0, 0, ""
    else:
        bad, sampled, first = _sample_unreadable(ds, SAMPLE)
    limit = cfg.data.max_unreadable_fraction
    if bad and bad / sampled > limit:
        raise DataError(
            f"{what}={path}: {bad} of {sampled} sampled image files could not be read "
            f"(more than data.max_unreadable_fraction={limit:g}); first: {first}")
    if len(ds) < min_images:
        raise DataError(f"{what}={path} holds {len(ds)} images, fewer than one global batch "
                        f"(train.batch_size={cfg.train.batch_size})")


def _model_differences(saved: DinoConfig, cfg: DinoConfig) -> list[str]:
    """``model.depth: 4 -> 2``-style lines for the settings that fix the weights' shapes."""
    return (_network_differences(saved, cfg) + _student_differences(saved, cfg)
            + _students_differences(saved, cfg))


def _network_differences(saved: DinoConfig, cfg: DinoConfig) -> list[str]:
    a, b = network_spec(saved), network_spec(cfg)
    out = []
    for key in a.__dataclass_fields__:
        if key in ("drop_path_rate", "pos_embed_interpolation"):  # no shape of their own
            continue
        if getattr(a, key) != getattr(b, key):
            name = "aug.global_size" if key == "img_size" else f"model.{key}"
            out.append(f"{name}: {getattr(a, key)} there, {getattr(b, key)} here")
    return out


def _students_differences(saved: DinoConfig, cfg: DinoConfig) -> list[str]:
    """Distillation's extra students (``train.distill.students``): the same names, each of
    the same model."""
    a, b = saved.student_configs(), cfg.student_configs()
    if sorted(a) != sorted(b):
        return [f"train.distill.students: {sorted(a)} there, {sorted(b)} here"]
    return [line.replace("model.", f"train.distill.students.{name}.", 1)
            for name in a for line in _network_differences(a[name], b[name])]


def _student_differences(saved: DinoConfig, cfg: DinoConfig) -> list[str]:
    """The distillation settings that fix the student's modules (its projectors, its head)."""
    a, b = saved.train.distill, cfg.train.distill
    pairs = [("train.distill.teacher", "set" if a.on else "empty", "set" if b.on else "empty")]
    if a.on and b.on:
        pairs += [(f"train.distill.{k}", getattr(a, k), getattr(b, k))
                  for k in ("objective", "projector_hidden_dim")]
        pairs += [(f"train.distill.{k}", f"{getattr(a, k):g}", f"{getattr(b, k):g}")
                  for k in ("cls_weight", "patch_weight") if (getattr(a, k) > 0) != (getattr(b, k) > 0)]
    return [f"{name}: {x} there, {y} here" for name, x, y in pairs if x != y]


def check_same_model(checkpoint: str, cfg: DinoConfig, what: str) -> None:
    saved = validate(ckpt.read_config(checkpoint), new_run=False)  # it may predate a rule
    diff = _model_differences(saved, cfg)
    if diff:
        raise ConfigError(f"{what} {checkpoint} holds another model than this config "
                          f"({'; '.join(diff)}); use the same model settings, or another "
                          f"run_name=... to start a new run")


def preflight(cfg: DinoConfig, run_url: str) -> None:
    """Everything about ``cfg`` that can be wrong without a cluster (``cfg`` resolved)."""
    check_storage(cfg.storage.root, cfg.storage.create_bucket)
    teacher_sha = distill.check(cfg)  # the teacher is given, reads and fits the student
    if cfg.data.loader == "ray_data" and not data.batched(cfg):
        raise ConfigError("data.loader=ray_data decodes to canvases for the batched "
                          "augmentation: it needs aug.backend=auto or batched, not per_image")
    if cfg.ray.elastic and cfg.data.loader == "ray_data":
        raise ConfigError(f"ray.num_workers={cfg.ray.min_workers}-{cfg.ray.max_workers} with "
                          "data.loader=ray_data: Ray Data's order is its own, so a resized "
                          "group could not re-partition what is left of an epoch; use "
                          "data.loader=torch or a fixed ray.num_workers")
    if cfg.ray.elastic and data.is_packed(cfg.data.path):
        raise ConfigError(f"ray.num_workers={cfg.ray.min_workers}-{cfg.ray.max_workers} with "
                          f"the packed dataset {cfg.data.path}: each rank streams its own "
                          "shards, a plan that a resize cannot re-partition mid-epoch yet; "
                          "use a fixed ray.num_workers (or an image folder)")
    check_images(cfg.data.path, cfg.data.source, cfg, "data.path", cfg.train.batch_size)
    if cfg.eval.knn_every_epochs:
        check_images(cfg.eval.train_path, cfg.eval.train_source, cfg, "eval.train_path")
        check_images(cfg.eval.val_path, cfg.eval.val_source, cfg, "eval.val_path")
    existing = ckpt.committed(run_url)  # reads each manifest's presence, not the state
    resume = existing[-1] if existing else None
    if existing:
        check_same_model(existing[-1], cfg, f"run {cfg.run_name!r}: its checkpoint")
    elif cfg.train.resume:
        try:
            resume = ckpt.resolve(cfg.train.resume)
        except CheckpointError as err:
            raise CheckpointError(f"train.resume: {err}") from None
        check_same_model(resume, cfg, "train.resume:")
    if resume is not None:
        distill.check_resumed(cfg, teacher_sha, resume)
    if cfg.train.init_from:
        check_init_from(cfg.train.init_from)
