"""Exception types: one for user errors (bad input), one for internal bugs; and the translation of library
and OS errors on user files into the first.

The CLI prints a `TgedgeError` as one line and exits 2; anything else is a bug and keeps its traceback
(exit 3). Exit codes are listed in docs/ERRORS.md.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

# What an OS error means for the user, where strerror alone is terse.
_OS_HINTS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.EISDIR: "is a directory", errno.ENOTDIR: "not a directory",
             errno.ELOOP: "too many levels of symbolic links", errno.EDQUOT: "disk quota exceeded",
             errno.ENAMETOOLONG: "file name too long", errno.ENOENT: "no such file or directory"}


class TgedgeError(Exception):
    """Bad input from the user: a missing file, a malformed checkpoint, a prompt that does not fit."""


class TgedgeInternalError(RuntimeError):
    """A broken invariant inside tgedge: a bug to report, not a user mistake."""


def os_error(e: OSError, path=None) -> TgedgeError:
    """`path: what went wrong` for an OSError; `path` names the user's file where e.filename is a temporary one."""
    name = path if path is not None else e.filename
    reason = _OS_HINTS.get(e.errno) or e.strerror or str(e)
    if e.errno in (errno.EEXIST, errno.ENOTDIR, errno.ELOOP) and name is not None:
        reason = _blocking_parent(name) or reason  # `mkdir -p afile/sub`: "File exists" names nothing useful
    other = f" -> {e.filename2}" if e.filename2 is not None and path is None else ""
    return TgedgeError(f"{name}{other}: {reason}" if name is not None else reason)


def _bad_link(path, e: OSError) -> str | None:
    """What a symlink that os.stat failed on is: a loop, or broken (naming its target); None for no symlink."""
    if e.errno == errno.ELOOP:
        return "a symlink loop"
    if os.path.islink(path):
        return f"a broken symlink (to {os.readlink(path)})"
    return None


def _blocking_parent(path) -> str | None:
    """Why a path cannot be made or reached: the first of its parents that is a file or a bad symlink."""
    for parent in reversed(Path(path).parents):
        if str(parent) in ("", ".", "/"):
            continue
        try:
            os.stat(parent)
        except OSError as e:
            link = _bad_link(parent, e)
            if link:
                return f"{parent} is {link}"
            continue
        if not os.path.isdir(parent):
            return f"{parent} is a file, not a directory"
    return None


def absent(path, what: str) -> str:
    """The end of a `PATH: ...` message for a `what` (e.g. "checkpoint directory") that cannot be used: not
    found, a symlink loop, a broken symlink, or a parent that is a file; never "not found" for what exists."""
    try:
        os.stat(path)
    except OSError as e:
        link = _bad_link(path, e)
        if link:
            return f"{what}: {link}"
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"{what}: permission denied"
        blocked = _blocking_parent(path)
        return f"{what} not found" + (f" ({blocked})" if blocked else "")
    if os.path.isdir(path):
        return f"is a directory, not a {what}"
    return f"is a file, not a {what}"


def as_user_error(e: BaseException) -> TgedgeError | None:
    """The user error an exception stands for (the CLI prints it as one line, exit 2), or None for a bug.

    Translate where the file is known (naming it); this is the boundary's last resort for what was not."""
    if isinstance(e, TgedgeError):
        return e
    if isinstance(e, OSError):
        return os_error(e)
    if isinstance(e, UnicodeDecodeError):
        return TgedgeError(f"not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start})")
    if isinstance(e, UnicodeEncodeError):
        return TgedgeError(f"text is not valid UTF-8 ({e.reason} at character {e.start})")
    if type(e).__name__ == "JSONDecodeError":  # json's, in a file the caller did not name
        return TgedgeError(f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})")
    if type(e).__name__ == "TOMLDecodeError":
        return TgedgeError(f"malformed TOML ({e})")
    protobuf = sys.modules.get("google.protobuf.message")
    if protobuf is not None and isinstance(e, protobuf.DecodeError):
        return TgedgeError(f"not a valid ONNX (protobuf) file ({e})")
    if isinstance(e, MemoryError):
        return TgedgeError("not enough memory for this input (lower the sizes or limits asked for)")
    image = sys.modules.get("PIL.Image")
    if image is not None and isinstance(e, image.DecompressionBombError):
        return TgedgeError(f"image too large ({e}); see TGEDGE_MAX_IMAGE_PIXELS in docs/ERRORS.md")
    return None


def one_line(message: str) -> str:
    """A message on one line: library errors sometimes span several."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())
