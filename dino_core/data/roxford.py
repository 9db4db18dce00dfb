"""The revisited Oxford and Paris layout (``revisitop``): ``<root>/<dataset>/gnd_<dataset>.pkl``
and the images in ``<root>/<dataset>/jpg/<name>.jpg``.

The ground-truth file is a pickle: a dict with ``imlist`` (gallery names), ``qimlist`` (query
names) and ``gnd`` (per query a dict of ``easy``, ``hard`` and ``junk`` gallery indices and the
query's box ``bbx``). ``pickle.load`` of a downloaded file runs whatever the file names, so it
is read by :class:`RestrictedUnpickler`, which builds plain containers and refuses every global
except numpy's array reconstruction (some versions of the files hold numpy arrays or scalars;
rebuilding those calls no user code, and an object array's items go through the same check).
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

# (module, name) of the only globals a ground-truth file may name: numpy's array and scalar
# reconstruction, under numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) spellings, and
# ``_codecs.encode`` and ``bytes``, with which protocol-2 pickles store an array's bytes.
SAFE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("builtins", "bytes"), ("__builtin__", "bytes"),
})  # fmt: skip
DATASETS = ("roxford5k", "rparis6k")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings, numbers and numpy arrays only.

    Raises:
        ValueError: the stream names any other global (a class, ``os.system``, ...), naming it.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise ValueError(f"refusing to unpickle the global {module}.{name}: a ground-truth file "
                         "holds only lists, dicts, strings, numbers and numpy arrays")


def safe_load_pickle(path: str | Path) -> Any:
    """The object in the pickle file ``path``, read by :class:`RestrictedUnpickler`."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(io.BytesIO(f.read())).load()


@dataclass
class RevisitedSet:
    """One revisited dataset: gallery and query names, the ground truth and the image folder.

    Attributes:
        gnd: per query ``{"easy", "hard", "junk": [gallery index], "bbx": [x0, y0, x1, y1]}``.
    """

    root: Path
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]] = field(default_factory=list)

    def image_path(self, name: str) -> Path:
        return self.root / "jpg" / f"{name}.jpg"

    def query_box(self, i: int) -> tuple[float, float, float, float] | None:
        bbx = self.gnd[i].get("bbx")
        return None if bbx is None else tuple(float(v) for v in bbx)  # type: ignore[return-value]


def _check(cfg: Any, path: Path) -> RevisitedSet:
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a dict, got {type(cfg).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in cfg:
            raise ValueError(f"{path}: no key {key!r} (has {', '.join(map(repr, cfg))})")
    imlist, qimlist, gnd = list(cfg["imlist"]), list(cfg["qimlist"]), list(cfg["gnd"])
    if len(gnd) != len(qimlist):
        raise ValueError(f"{path}: {len(gnd)} 'gnd' entries for {len(qimlist)} queries")
    for q, g in enumerate(gnd):
        if not isinstance(g, dict):
            raise ValueError(f"{path}: gnd[{q}] is a {type(g).__name__}, not a dict")
        lists = [k for k in ("ok", "easy", "hard", "junk") if k in g]
        if not lists:
            raise ValueError(f"{path}: gnd[{q}] has neither 'ok' nor 'easy'/'hard'/'junk'")
        for k in lists:
            bad = [int(i) for i in g[k] if not 0 <= int(i) < len(imlist)]
            if bad:
                raise ValueError(f"{path}: gnd[{q}][{k!r}] holds indices outside the "
                                 f"{len(imlist)} gallery images: {bad[:5]}")
    return RevisitedSet(path.parent, [str(n) for n in imlist], [str(n) for n in qimlist], gnd)


def load_revisited(root: str | Path, dataset: str) -> RevisitedSet:
    """Reads ``<root>/<dataset>/gnd_<dataset>.pkl`` (any dataset name in this layout; the
    reference knows ``roxford5k`` and ``rparis6k``).

    Raises:
        FileNotFoundError: no ground-truth file there.
        ValueError: the file names a global other than numpy's, or lacks a key.
    """
    path = Path(root) / dataset / f"gnd_{dataset}.pkl"
    if not path.is_file():
        raise FileNotFoundError(f"no ground truth {path} (layout: <root>/<dataset>/"
                                f"gnd_<dataset>.pkl, images in <root>/<dataset>/jpg/)")
    return _check(safe_load_pickle(path), path)


def write_revisited(root: str | Path, dataset: str, gallery: list[Image.Image],
                    queries: list[Image.Image], gnd: list[dict[str, Any]]) -> Path:
    """Writes images and ground truth in the revisited layout (JPEG quality 95); names are
    ``g000000`` and ``q000000``. Returns the dataset folder."""
    folder = Path(root) / dataset
    (folder / "jpg").mkdir(parents=True, exist_ok=True)
    imlist = [f"g{i:06d}" for i in range(len(gallery))]
    qimlist = [f"q{i:06d}" for i in range(len(queries))]
    for names, images in ((imlist, gallery), (qimlist, queries)):
        for name, image in zip(names, images):
            image.save(folder / "jpg" / f"{name}.jpg", quality=95)
    plain = [{k: [float(x) for x in v] if k == "bbx" else [int(x) for x in v]
              for k, v in g.items()} for g in gnd]
    with open(folder / f"gnd_{dataset}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": plain}, f)
    return folder
