"""Storage: fsspec URLs (``fs``), retries through outages (``retry``), the pyarrow handler
Ray Train writes through (``arrow``), checkpoint directories (``checkpoints``) and the
one-driver-per-run lock (``runlock``)."""

from service.errors import StorageError
from service.storage.fs import (
    check_bucket,
    check_writable,
    download_dir,
    download_file,
    exists,
    get_fs,
    is_local,
    join,
    list_dirs,
    makedirs,
    read_bytes,
    replace_file,
    upload_dir,
    upload_file,
    with_scheme,
    write_bytes,
)
from service.storage.retry import (
    GAVE_UP,
    Retrier,
    configure,
    is_transient,
    retry_seconds,
    spool_dir,
    with_retries,
)

__all__ = [
    "GAVE_UP",
    "Retrier",
    "StorageError",
    "check_bucket",
    "check_writable",
    "configure",
    "download_dir",
    "download_file",
    "exists",
    "get_fs",
    "is_local",
    "is_transient",
    "join",
    "list_dirs",
    "makedirs",
    "read_bytes",
    "replace_file",
    "retry_seconds",
    "spool_dir",
    "upload_dir",
    "upload_file",
    "with_retries",
    "with_scheme",
    "write_bytes",
]
