"""A folder in S3 reads as the same dataset as the same folder on disk: the same samples in
the same order, the same classes (an empty class folder included), the same labels, and the
same skipping of unreadable files (moto's S3 server on 127.0.0.1)."""

from __future__ import annotations

import pytest
from PIL import Image

from dino_core.data.folder import ImageFolder
from service.data import RemoteImageFolder

pytestmark = pytest.mark.integration


@pytest.mark.budget(90)
def test_remote_and_local_folders_are_one_behaviour(s3_server, tmp_path):
    import s3fs

    root = tmp_path / "imgs"
    for cls, n in (("cat", 2), ("dog", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 10), (40 * i, 90, 0)).save(root / cls / f"{i}.png")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    (root / "dog" / ".hidden.png").write_bytes(b"skipped by name")
    (root / "empty").mkdir()  # a class with no images yet keeps its label
    bucket = s3_server.new_bucket("folder")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(root), f"{bucket}/imgs", recursive=True)
    fs.pipe(f"{bucket}/imgs/empty/", b"")  # how object stores keep an empty folder

    local, remote = ImageFolder(root), RemoteImageFolder(f"s3://{bucket}/imgs")
    assert local.classes == remote.classes == ["cat", "dog", "empty"]
    names = [p.rsplit("/imgs/", 1)[1] for p, _ in local.samples]
    assert names == [p.rsplit("/imgs/", 1)[1] for p, _ in remote.samples]
    assert [y for _, y in local.samples] == [y for _, y in remote.samples] == [0, 0, 1, 1, 1, 1]
    for ds in (local, remote):
        items = [ds[i] for i in range(len(ds))]
        assert sum(item is None for item in items) == 1 and ds.num_skipped == 1
        assert items[0][0].size == (12, 10) and items[0][1] == 0
