"""What the search commands read and write besides the embeddings: image files (for
``--grid``) and their outputs (``--grid``, ``--out``), each a local path or a URL."""

from __future__ import annotations

from service.storage import get_fs, is_local, with_retries


def read_bytes(location: str) -> bytes:
    """The bytes of a file; OSError (or a StorageError) when it cannot be read."""
    if is_local(location):
        with open(location.removeprefix("file://"), "rb") as f:
            return f.read()
    fs, path = get_fs(location)
    return with_retries(lambda: fs.cat_file(path), f"read of {location}", url=location)


def write_bytes(location: str, body: bytes) -> None:
    """Writes a whole file (a local file's folder must exist)."""
    if is_local(location):
        with open(location.removeprefix("file://"), "wb") as f:
            f.write(body)
        return
    fs, path = get_fs(location)
    with_retries(lambda: fs.pipe_file(path, body), f"write of {location}", url=location)
