"""Images/s of ``dino embed``'s pipeline against a plain single-process loop, and the time to
resume a job stopped half way.

Sides, every one on the same images (procedural PNGs in 3 class folders, generated once into
``--work``), the same random backbone (an exported ``.safetensors``) and the same
preprocessing (``eval_transform``: the k-NN evaluation's), giving the same vectors (checked:
``agree``):

- ``loop``: a torch ``DataLoader`` over ``ImageFolder`` (``--cpus`` loader processes) and the
  backbone in this process (1 torch thread), what a user would write by hand;
- ``ray_1_actor``, ``ray_2_actors``: ``service.embed.run_embed`` on a local Ray of ``--cpus``
  + 1 logical CPUs (so that 2 actors of 1 CPU still leave decode tasks room), writing its
  Parquet parts and manifest to a fresh folder each turn.

A turn is a whole job, start-up included (the loop's worker processes, the pipeline's tasks
and actors); the local Ray is started once, before the first turn, and is not counted. The
sides take turns (``bench/fair.py``): ``--warmup`` untimed rounds, then ``--rounds`` timed
ones, each side's first turn rotating; each prints the median images/s and its range, and
its ratio to the loop (ratio of medians, with the range of the per-round ratios).

``resume``: a finished 1-actor output with its second half of parts deleted and its manifest
set back to ``complete: false`` (what a job killed half way leaves), then the same job
again, timed: it reads the parts' keys and embeds the half that is missing. Printed against
the full 1-actor job's time of the same round.

Usage:
    python bench/embed.py --ci                 # 64 images, about a minute
    python bench/embed.py                      # 5,000 images
    python bench/embed.py --images 2000 --side 64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fair import alternate, fields, paired_ratios, ratio  # noqa: E402
from local_ray import local_ray  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def make_images(work: Path, n: int, size: int) -> Path:
    from dino_core.data.procedural import write_image_folder

    root = work / f"images-{n}-{size}"
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        write_image_folder(root, n, size, 3, 0, masks=False)
        (root / ".done").write_text("")
    return root


def make_backbone(work: Path, arch: str, patch: int, depth: int, side: int) -> str:
    from dino_core.interop.export import save_backbone
    from dino_core.models.backbone import build_backbone
    from service.config import load_config
    from service.config.specs import run_metadata

    path = work / f"{arch}-{patch}-{depth}-{side}.safetensors"
    torch.manual_seed(0)
    weights = build_backbone(arch, patch, side, depth=depth).state_dict()
    cfg = load_config("quickstart", overrides=[f"eval.image_size={side}"])
    save_backbone(path, weights, {"arch": arch, "patch_size": patch, "depth": depth,
                                  "img_size": side}, run_metadata(cfg))
    return str(path)


def loop_turn(checkpoint: str, root: Path, side: int, batch: int, workers: int):
    """Seconds and vectors of the plain loop."""
    from dino_core.augment.per_image import eval_transform
    from dino_core.data.folder import ImageFolder
    from service.data import eval_loader
    from service.embed.features import embed_batch
    from service.models.backbones import load_backbone

    start = time.perf_counter()
    model, _ = load_backbone(checkpoint)
    ds = ImageFolder(root, transform=eval_transform(side))
    out = [embed_batch(model, x, "cls") for x, *_ in eval_loader(ds, batch, workers)]
    seconds = time.perf_counter() - start
    keys = [os.path.relpath(p, root) for p, _ in ds.samples]
    return seconds, dict(zip(keys, torch.cat(out).numpy()))


def ray_turn(checkpoint: str, root: Path, out: Path, side: int, batch: int, actors: int,
             part_rows: int) -> float:
    from service.embed import check_inputs, run_embed
    from service.embed.pipeline import Resources

    start = time.perf_counter()
    checked = check_inputs(checkpoint, str(root), str(out), image_size=side,
                           part_rows=part_rows)
    run_embed(checked, str(out), Resources(actors=actors, batch_size=batch), lambda _: None)
    return time.perf_counter() - start


def halve(out: Path) -> None:
    """What a job killed half way leaves: the first half of its parts, complete=false."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = manifest["parts"]
    for p in parts[len(parts) // 2:]:
        (out / p["file"]).unlink()
    keep = parts[:len(parts) // 2]
    manifest.update(complete=False, parts=keep, count=sum(p["rows"] for p in keep))
    (out / "manifest.json").write_text(json.dumps(manifest))


def vectors(out: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    found = {}
    for part in sorted(out.glob("part-*.parquet")):
        t = pq.read_table(part)
        found.update(zip(t.column("key").to_pylist(),
                         (np.asarray(e, np.float32) for e in t.column("embedding").to_pylist())))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ci", action="store_true", help="64 images, 1 warm-up and 2 rounds")
    p.add_argument("--images", type=int, default=0, help="images (default 5000; ci 64)")
    p.add_argument("--image-px", type=int, default=64, help="side of the generated PNGs")
    p.add_argument("--side", type=int, default=0, help="crop side (default 64; ci 32)")
    p.add_argument("--arch", default="vit_tiny")
    p.add_argument("--patch", type=int, default=8)
    p.add_argument("--depth", type=int, default=0, help="blocks (default 4; ci 1)")
    p.add_argument("--batch", type=int, default=64, help="images per forward")
    p.add_argument("--cpus", type=int, default=min(os.cpu_count() or 1, 2),
                   help="loader processes of the loop; the local Ray has one more")
    p.add_argument("--rounds", type=int, default=0, help="timed rounds (default 3; ci 2)")
    p.add_argument("--warmup", type=int, default=-1, help="untimed rounds (default 1; ci 0)")
    p.add_argument("--work", default="", help="folder for the images (default: temporary)")
    a = p.parse_args(argv)
    n = a.images or (64 if a.ci else 5000)
    side = a.side or (32 if a.ci else 64)
    depth = a.depth or (1 if a.ci else 4)
    rounds = a.rounds or (2 if a.ci else 3)
    warmup = a.warmup if a.warmup >= 0 else (0 if a.ci else 1)
    part_rows = max(1, n // 10)
    torch.set_num_threads(1)  # the loop's model, as one actor's
    work = Path(a.work or tempfile.mkdtemp(prefix="dino-bench-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("out-*"), *work.glob("resume-*")]:  # a reused --work's last outputs
        shutil.rmtree(old)
    t0 = time.perf_counter()
    root = make_images(work, n, a.image_px)
    checkpoint = make_backbone(work, a.arch, a.patch, depth, side)
    emit({"kind": "config", "images": n, "side": side, "arch": a.arch, "patch": a.patch,
          "depth": depth, "batch": a.batch, "cpus": a.cpus, "ray_cpus": a.cpus + 1,
          "rounds": rounds, "warmup": warmup, "part_rows": part_rows,
          "setup_s": round(time.perf_counter() - t0, 2),
          "sides": ["loop", "ray_1_actor", "ray_2_actors"]})
    turns = iter(range(10**6))
    loop_vectors: dict[str, np.ndarray] = {}

    def loop() -> float:
        seconds, found = loop_turn(checkpoint, root, side, a.batch, a.cpus)
        loop_vectors.update(found)
        return seconds

    def pipeline(actors: int):
        return lambda: ray_turn(checkpoint, root, work / f"out-{next(turns)}", side, a.batch,
                                actors, part_rows)

    with local_ray(a.cpus + 1, include_dashboard=False, log_to_driver=False):
        seconds = alternate({"loop": loop, "ray_1_actor": pipeline(1),
                             "ray_2_actors": pipeline(2)}, rounds, warmup)
        last = max(work.glob("out-*"), key=lambda d: int(d.name.split("-")[1]))
        got = vectors(last)
        agree = (sorted(got) == sorted(loop_vectors) and max(
            float(np.abs(got[k] - loop_vectors[k]).max()) for k in got) < 1e-5)
        rates = {name: [n / s for s in secs] for name, secs in seconds.items()}
        for name, r in rates.items():
            emit({"side": name, **fields("images_per_sec", r, 1), "rounds": rounds,
                  "ratio_to_loop": ratio(r, rates["loop"]),
                  "ratio_to_loop_spread": [round(min(x), 3), round(max(x), 3)]
                  if (x := paired_ratios(r, rates["loop"])) else None,
                  "agree": agree if name != "loop" else True})

        full, resumed = [], []
        for r in range(rounds):
            out = work / f"resume-{r}"
            full.append(ray_turn(checkpoint, root, out, side, a.batch, 1, part_rows))
            halve(out)
            resumed.append(ray_turn(checkpoint, root, out, side, a.batch, 1, part_rows))
            assert sorted(vectors(out)) == sorted(loop_vectors), "resume left a gap"
        emit({"kind": "resume", **fields("full_s", full), **fields("resume_s", resumed),
              "resume_over_full": ratio(resumed, full), "rounds": rounds,
              "note": "resume: the same job on an output with its second half of parts "
                      "deleted and complete=false"})
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    emit({"kind": "summary", "images": n,
          "images_per_sec": {k: fields("x", v, 1)["x"] for k, v in rates.items()},
          "ray_1_actor_over_loop": ratio(rates["ray_1_actor"], rates["loop"]),
          "ray_2_actors_over_loop": ratio(rates["ray_2_actors"], rates["loop"]),
          "resume_over_full": ratio(resumed, full), "agree": agree})
    return 0


if __name__ == "__main__":
    sys.exit(main())
