"""What a job on ``--out`` does: start, resume, add new images, or refuse.

- No manifest: a fresh job (part files without a manifest are not ours: refused).
- A manifest with ``complete: false`` (a job killed or stopped): resume, embedding only the
  keys that no part holds; the settings must be the manifest's.
- ``complete: true``: with ``--incremental``, embed only the keys no part holds (new images)
  as new parts; without, a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.embed.output import (
    list_parts,
    new_manifest,
    next_index,
    read_manifest,
    read_part,
)
from service.embed.sources import Source
from service.embed.spec import EmbedSpec
from service.errors import ConfigError, DataError

COMPARED = ("checkpoint", "data", "features", "image_size", "dim", "dtype")


@dataclass
class Plan:
    """Attributes:
        mode: ``fresh``, ``resume`` or ``incremental``.
        manifest: the manifest to write (the existing one, parts re-read from the folder).
        done: keys already in a part.
        todo: ``(key, label)`` still to embed (a folder or URL; empty when packed).
        total: images the job will look at (a packed set: the manifest's count less done).
        first_part: the index of the next part file.
    """

    mode: str
    manifest: dict[str, Any]
    done: set[str]
    todo: list[tuple[str, int]]
    total: int
    first_part: int


def plan_job(out: str, spec: EmbedSpec, source: Source, incremental: bool) -> Plan:
    """The plan of a job (reads the manifest and the ``key`` column of every part).

    Raises:
        ConfigError: ``out`` is complete and ``incremental`` not given, or its settings are
            not this job's.
        DataError: ``out`` holds part files but no manifest; a class list changed.
    """
    old = read_manifest(out)
    parts = list_parts(out)
    if old is None:
        if parts:
            raise DataError(f"--out {out} holds {len(parts)} part files but no manifest.json: "
                            "not a `dino embed` output; give an empty or new --out")
        return _plan("fresh", new_manifest(spec, source.location), set(), source, [])
    _same_settings(out, old, new_manifest(spec, source.location))
    if old.get("complete") and not incremental:
        raise ConfigError(
            f"--out {out} already holds a complete embedding of {old.get('count', 0)} images; "
            "add --incremental to embed only images that are not in it, or give another --out")
    old_classes = (old.get("settings") or {}).get("classes") or []
    if list(source.classes) != list(old_classes):
        raise DataError(f"the classes of {source.location} changed since {out} was written "
                        f"({len(old_classes)} then, {len(source.classes)} now): its labels "
                        "would not match; embed into another --out")
    done: set[str] = set()
    rows = []
    for name in parts:
        keys = read_part(out, name, ["key"]).column("key").to_pylist()
        done.update(keys)
        rows.append({"file": name, "rows": len(keys)})
    manifest = {**old, "complete": False, "parts": rows, "count": sum(r["rows"] for r in rows),
                "skipped": []}  # unreadable images of earlier runs are tried again
    mode = "incremental" if old.get("complete") else "resume"
    return _plan(mode, manifest, done, source, parts)


def _plan(mode: str, manifest: dict[str, Any], done: set[str], source: Source,
          parts: list[str]) -> Plan:
    todo = [(k, y) for k, y in source.items if k not in done]
    total = len(todo) if not source.packed else max(source.count - len(done), 0)
    return Plan(mode, manifest, done, todo, total, next_index(parts))


def _same_settings(out: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    differ = [f"{k} {old.get(k)!r} there, {new[k]!r} now" for k in COMPARED
              if old.get(k) != new[k]]
    old_s, new_s = old.get("settings") or {}, new["settings"]
    differ += [f"settings.{k} {old_s.get(k)!r} there, {new_s[k]!r} now" for k in new_s
               if k != "classes" and old_s.get(k) != new_s[k]]
    if differ:
        raise ConfigError(f"--out {out} was embedded with other settings ({'; '.join(differ)}): "
                          "rerun with its settings, or give another --out")
