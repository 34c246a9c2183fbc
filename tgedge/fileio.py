"""Writing outputs and reading named files, safely (docs/ERRORS.md has the rules as users see them).

Outputs: `-o` must be absent, an empty directory, or an earlier tgedge output of the same kind (its marker
file `.tgedge-output` says which kind and lists the files tgedge wrote there); anything else is refused
unless `force`. `-o` may never be an input, lie inside one or hold one, nor be the working directory, one of
its parents, the home directory or `/`, `force` or not. The new output is written to a temporary folder
beside `-o`, then swapped in: one atomic exchange on Linux (renameat2), elsewhere rename-aside then
rename-in with Ctrl-C held back between the two; the old output is deleted last. An interrupt leaves the
old output or the new one, whole.

Paths read from files (manifests, data folders, index files) go through `inside()`: resolved, symlinks
included, and refused unless they stay inside their directory.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from tgedge import DEMO_FOLDERS, demo_checkpoint, resolve_checkpoint
from tgedge.errors import TgedgeError, os_error

log = logging.getLogger("tgedge")

MARKER = ".tgedge-output"
# What tgedge writes with -o. "output" is unspecified: it matches any kind (call sites not yet told theirs).
KINDS = ("checkpoint", "data", "export", "engines", "repository", "output")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def usual_file_mode(path: str | Path) -> None:
    """Give a file the mode the user's umask gives new files (safetensors writes its files 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def _real(path: str | Path) -> Path:
    try:
        return Path(os.path.realpath(path))
    except (OSError, ValueError) as e:
        raise TgedgeError(f"{path}: not a usable path ({e})") from None


# What a path that is not a regular file is, in words.
_SPECIAL = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_file(path: str | Path) -> str | None:
    """What `path` is ("a FIFO (named pipe)", "a directory", ...) when it exists and is not a regular file, else None.
    Checked before opening an input: reading a FIFO blocks until something writes to it, a device may never end."""
    try:
        mode = os.stat(path).st_mode  # symbolic links followed: what an open would read
    except (OSError, ValueError):
        return None  # missing or unreadable: the open that follows names it
    if stat.S_ISREG(mode):
        return None
    return next((kind for test, kind in _SPECIAL if test(mode)), "a special file")


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path`, refused (one line) when it exists and is not a regular file: every file tgedge reads comes through
    here or `read_input` before it is opened, so a FIFO or a device (`/dev/zero`) is refused instead of hanging."""
    kind = special_file(path)
    if kind is not None:
        raise TgedgeError(f"{path}: is {kind}, not a {what}" if kind != "a directory" else
                          f"{path}: is a directory, not a {what}")
    return Path(path)


def read_input(path: str | Path, what: str = "file") -> bytes:
    """The bytes of a file tgedge reads (`regular_file` first); OS errors name the file."""
    regular_file(path, what)
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise os_error(e, path) from None


# -- reading names from files ---------------------------------------------------------------------------------
def inside(directory: str | Path, name, what: str) -> Path:
    """`directory / name`, resolved (symlinks included), refused unless it stays inside `directory`.

    `what` names the file and key the name came from, e.g. "data/samples.jsonl:3 image"."""
    if not isinstance(name, str) or not name.strip():
        raise TgedgeError(f"{what}: expected a file name relative to {directory}, got {name!r}")
    if "\x00" in name:
        raise TgedgeError(f"{what}: {name!r} holds a NUL character")
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise TgedgeError(f"{what}: {name!r} is an absolute path; files must be named relative to {directory}")
    base = _real(directory)
    full = _real(base / name)
    if base not in full.parents:
        raise TgedgeError(f"{what}: {name!r} resolves to {full}, outside {directory}")
    return full


# -- report files ----------------------------------------------------------------------------------------------
def check_report(path: str | Path | None, flag: str, inputs: Iterable = (), what: str = "the report") -> None:
    """A report file (`--json F`, `--junit F`, ...; `what` else, e.g. a timing cache) may be written at `path`: never
    an input of the command (a file it reads, or anything inside a directory it reads), never an existing directory
    (`write_atomic` creates missing parents). Refused before any work, so a typo cannot replace a manifest, a graph
    or a data file."""
    if path is None or str(path) == "-":
        return
    target = _real(path)
    if target.is_dir():
        raise TgedgeError(f"{flag} {path}: is a directory; give a file name")
    # the embedded demo models are package data, an input of whatever names (or defaults to) them: never written
    embedded = [demo_checkpoint(family) for family in DEMO_FOLDERS]
    for given in [*(resolve_checkpoint(g) for g in inputs if g is not None), *embedded]:
        src = _real(given)
        if target == src or src in target.parents:
            raise TgedgeError(f"{flag} {path}: it is {'inside ' if target != src else ''}an input of this command "
                              f"({given}); write the report elsewhere")


def distinct_reports(reports: Iterable[tuple[str | Path | None, str]]) -> None:
    """(path, flag) pairs: no two report options name the same file (the last written would replace the others)."""
    seen: dict[Path, tuple[str, str | Path]] = {}
    for path, flag in reports:
        if path is None or str(path) == "-":
            continue
        target = _real(path)
        if target in seen:
            raise TgedgeError(f"{seen[target][0]} and {flag} both name {path}: give each report its own file")
        seen[target] = (flag, path)


# -- output directories ----------------------------------------------------------------------------------------
def read_marker(directory: str | Path) -> dict | None:
    """The marker of an earlier tgedge output, or None (no marker, or one that does not parse)."""
    try:
        d = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("kind"), str) else None


def _files(directory: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        rel = Path(root).relative_to(directory)
        out += [(rel / f).as_posix() for f in files]
        # a symlinked folder is listed as a file: walking into it would reach outside
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(p for p in out if p != MARKER)


def _write_marker(directory: Path, kind: str) -> None:
    record = {"kind": kind, "files": _files(directory)}
    (directory / MARKER).write_text(json.dumps(record, indent=0) + "\n", encoding="utf-8")


def _same_kind(a: str, b: str) -> bool:
    return a == b or "output" in (a, b)


def _derived(kind: str, name: str) -> bool:
    """A file a server derives from what tgedge wrote: Python's cache of a repository's model.py files, which
    tritonserver's Python-backend stubs write beside them when they load the models."""
    return kind == "repository" and name.endswith(".pyc") and "__pycache__" in name.split("/")[:-1]


def _no_dangling_link(out: str | Path) -> None:
    """`out`, or the nearest of its parents that is there, is no symbolic link to nothing: writing through it would
    create the link's target (and its parents) wherever it points (-o dang, dang -> nowhere/at/all)."""
    for p in (Path(out), *Path(out).parents):
        if os.path.lexists(p):
            if p.is_symlink() and not p.exists():
                where = "is" if p == Path(out) else f"is inside {p}, which is"
                try:
                    os.stat(p)
                except OSError as e:
                    if e.errno == errno.ELOOP:  # no target to create: a loop, said as everywhere else
                        raise TgedgeError(f"{out}: {p} is a symlink loop: remove the link or name another folder "
                                          "for -o") from None
                raise TgedgeError(f"{out}: {where} a symbolic link to {os.readlink(p)}, which does not exist: "
                                  "remove the link or name another folder for -o")
            return


def check_output(out: str | Path, kind: str = "output", inputs: Iterable = (), force: bool = False) -> Path:
    """Refuse an `-o` that tgedge may not replace (one line, naming it); return the directory it will write."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    _no_dangling_link(out)
    target = _real(out)
    hint = "pick another -o, or pass --force to replace it"
    home = _real(Path.home())
    if target == Path(target.anchor) or target == home:
        raise TgedgeError(f"{out}: is {'/' if target != home else 'the home directory'}: name a new folder for -o")
    cwd = _real(Path.cwd())
    if target == cwd or target in cwd.parents:
        raise TgedgeError(f"{out}: is the working directory{'' if target == cwd else ' or holds it'}: "
                          "name a new folder for -o")
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = _real(given)
        if source == target:
            raise TgedgeError(f"{out}: is the input {given}: write the output to another folder")
        if source in target.parents:
            raise TgedgeError(f"{out}: lies inside the input {given}: write the output to another folder")
        if target in source.parents:
            raise TgedgeError(f"{out}: holds the input {given}; replacing it would delete the input")
    if not os.path.lexists(target):
        return target
    if not target.is_dir():
        if force:
            return target
        raise TgedgeError(f"{out}: exists and is not a directory: {hint}")
    try:
        entries = sorted(p.name for p in target.iterdir())
    except OSError as e:
        raise os_error(e, out) from None
    if not entries or force:
        return target
    marker = read_marker(target)
    if marker is None:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise TgedgeError(f"{out}: not empty ({shown}) and not a tgedge output: {hint}")
    if not _same_kind(marker["kind"], kind):
        raise TgedgeError(f"{out}: holds a tgedge {marker['kind']} output, not {kind}: {hint}")
    written = set(marker.get("files") or [])
    foreign = [f for f in _files(target) if f not in written and not _derived(kind, f)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise TgedgeError(f"{out}: holds files tgedge did not write ({shown}): move them, or pass --force")
    return target


_libc_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    global _libc_renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _libc_renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (OSError, AttributeError):
            _libc_renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _libc_renameat2 = fn
    if _libc_renameat2 is False:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _libc_renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False  # this file system cannot exchange: rename aside instead
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def _interrupts_held():
    """Hold SIGINT/SIGTERM back (main thread only) and deliver them when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda sig, frame: caught.append(sig)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            signal.raise_signal(s)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass
    if os.path.lexists(path):
        log.warning("%s: the replaced output could not be deleted entirely; delete it by hand", path)


def _swap_in(new: Path, target: Path) -> None:
    """Put `new` at `target`; delete what was there only once `new` is in place."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    with _interrupts_held():
        if _exchange(new, target):
            old = new  # the exchange left the old output at the temporary name
        else:
            old = target.with_name(f".{target.name}.tgedge-old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(target, old)
            try:
                os.rename(new, target)
            except BaseException:
                os.rename(old, target)
                raise
        _remove(old)


@contextmanager
def atomic_dir(out: str | Path, kind: str = "output", inputs: Iterable = (), force: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out` (see the module docstring), on
    any failure it is removed and `out` is left as it was. OS errors become TgedgeError naming `out`."""
    target = check_output(out, kind, inputs, force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tgedge-new-", dir=target.parent))
    except OSError as e:
        raise os_error(e, out) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename
        yield tmp
        _write_marker(tmp, kind)
        _swap_in(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _output_error(e, tmp, out) from None
        raise


def _output_error(e: OSError, tmp: Path, out: str | Path) -> TgedgeError:
    """Name the user's output, not the temporary folder, in an OS error met while writing it."""
    name = e.filename
    if name is not None and str(name).startswith(str(tmp)):
        name = Path(out) / Path(name).relative_to(tmp)
    return os_error(e, name if name is not None else out)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write one file through a temporary name beside it, then rename: readers see the old file or the new one.

    The temporary file is removed on every error path; OS errors become TgedgeError naming `path`."""
    out = Path(path)
    if out.is_dir():
        raise TgedgeError(f"{out}: is a directory; name a file to write")
    real = _real(out.parent) / out.name  # `link/new/../r.json` must not create new/ where the link points
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=".tmp", dir=real.parent)
    except OSError as e:
        raise os_error(e, out) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, real)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise os_error(e, out) from None
        raise


def fingerprint(path: str | Path, edge: int = 1 << 20) -> str:
    """A cheap identity for a large file (size + sha256 of its first and last MiB): what `run` can afford to
    check on every start where validate checks the full sha256."""
    h = hashlib.sha256()
    regular_file(path, "graph file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(size - edge, edge))
            h.update(f.read(edge))
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over several files (names and bytes), read in chunks."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode())
        regular_file(p)
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def checkpoint_hash(directory: str | Path) -> str:
    """One hash over a checkpoint's weights and JSON files: what an export records as its source."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.is_file())
    return sha256_files(files)
