"""Writing outputs so that nothing half-written is ever left behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_file_mode(path: str | Path) -> None:
    """Give a file the mode the user's umask gives new files (safetensors writes its files 0600)."""
    os.chmod(path, 0o666 & ~_umask())


@contextmanager
def atomic_dir(out: str | Path):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write one file through a temporary name beside it, then rename: readers see the old file or the new one."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, out)


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files (names and bytes), read in chunks."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
