"""tgedge.fileio: the output-directory rule, interrupt-safe replacement, temp files on every error path, inside()."""

import errno
import os

import pytest

from tgedge import fileio
from tgedge.errors import TgedgeError
from tgedge.fileio import MARKER, atomic_dir, check_output, inside, read_marker, write_atomic


def write(out, kind="export", files=("a.txt",), text="first", **kw):
    with atomic_dir(out, kind=kind, **kw) as tmp:
        for f in files:
            (tmp / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp / f).write_text(text)
    return out


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


def test_failure_leaves_old_output_and_no_temp(tmp_path):
    out = write(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, kind="export") as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "first"
    assert siblings(out) == ["out"]


def test_marker_names_kind_and_files(tmp_path):
    out = write(tmp_path / "out", files=("a.txt", "sub/b.txt"))
    assert read_marker(out) == {"kind": "export", "files": ["a.txt", "sub/b.txt"]}
    write(out, text="second")  # a previous output of the same kind is replaced
    assert (out / "a.txt").read_text() == "second" and not (out / "sub").exists()
    assert siblings(out) == ["out"]


@pytest.mark.parametrize("setup, match", [
    (lambda d: (d / "notes.txt").write_text("mine"), r"not empty \(notes.txt\) and not a tgedge output"),
    (lambda d: write(d, kind="data"), "holds a tgedge data output, not export"),
    (lambda d: (write(d), (d / "notes.txt").write_text("mine")), r"holds files tgedge did not write \(notes.txt\)"),
    (lambda d: (write(d), (d / MARKER).write_text("{oops")), "not a tgedge output"),
])
def test_refused_without_force_and_nothing_deleted(tmp_path, setup, match):
    out = tmp_path / "out"
    out.mkdir()
    setup(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TgedgeError, match=match):
        write(out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert siblings(out) == ["out"]
    write(out, force=True)  # the user says so
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "a.txt"]


def test_a_file_at_o_is_refused_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.write_text("mine")
    with pytest.raises(TgedgeError, match="exists and is not a directory"):
        write(out)
    write(out, force=True)
    assert (out / "a.txt").exists()


def test_empty_directory_is_used(tmp_path):
    (tmp_path / "out").mkdir()
    write(tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").exists()


def test_inputs_and_working_directory_refused_even_with_force(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    for out, match in [(ckpt, "is the input"), (ckpt / "export", "lies inside the input"),
                       (tmp_path, "holds the input")]:
        with pytest.raises(TgedgeError, match=match):
            check_output(out, "export", [ckpt], force=True)
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    with pytest.raises(TgedgeError, match="is the input"):  # symlinks resolved
        check_output(link, "export", [ckpt], force=True)
    monkeypatch.chdir(ckpt)
    for out in (".", "..", os.path.expanduser("~"), "/"):
        with pytest.raises(TgedgeError, match="working directory|home directory|is /"):
            check_output(out, "export", force=True)
    assert (ckpt / "config.json").read_text() == "{}"


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("fail_at", ["rename-in", "delete-old"])
def test_interrupted_replace_leaves_old_or_new_whole(tmp_path, monkeypatch, exchange, fail_at):
    out = write(tmp_path / "out", files=("a.txt", "b.txt"), text="old")
    real_rename, real_remove, real_exchange = os.rename, fileio._remove, fileio._exchange

    def rename(a, b):
        if fail_at == "rename-in" and str(b) == str(out) and ".tgedge-new-" in str(a):
            raise KeyboardInterrupt  # between rename-aside and rename-in
        return real_rename(a, b)

    def exchange(a, b):
        if fail_at == "rename-in":
            raise KeyboardInterrupt  # before the exchange
        return real_exchange(a, b)

    def remove(path):
        real_remove(path)  # Ctrl-C held back until the old output is gone
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio.os, "rename", rename)
    monkeypatch.setattr(fileio, "_exchange", exchange if exchange else lambda a, b: False)
    if fail_at == "delete-old":
        monkeypatch.setattr(fileio, "_remove", remove)
    with pytest.raises(KeyboardInterrupt):
        write(out, files=("a.txt", "b.txt"), text="new")
    expected = "old" if fail_at == "rename-in" else "new"
    assert [(out / f).read_text() for f in ("a.txt", "b.txt")] == [expected] * 2
    assert siblings(out) == ["out"]


def test_sigint_during_swap_is_delivered_after_it(tmp_path, monkeypatch):
    import signal

    # the precondition, whatever an earlier test or library left: Ctrl-C raises KeyboardInterrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = write(tmp_path / "out", text="old")
    real_exchange = fileio._exchange

    def exchange(a, b):
        signal.raise_signal(signal.SIGINT)  # arrives mid-swap: held back until the swap is done
        return real_exchange(a, b)

    monkeypatch.setattr(fileio, "_exchange", exchange)
    try:
        with pytest.raises(KeyboardInterrupt):
            write(out, text="new")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (out / "a.txt").read_text() == "new" and siblings(out) == ["out"]


def test_disk_full_removes_temp_and_names_output(tmp_path):
    out = write(tmp_path / "out")

    with pytest.raises(TgedgeError, match=r"out/big.bin: no space left on the device"):
        with atomic_dir(out, kind="export") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "big.bin"))
    assert siblings(out) == ["out"] and (out / "a.txt").read_text() == "first"


def test_read_only_parent_is_one_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(TgedgeError, match="permission denied"):
            write(ro / "out")
        with pytest.raises(TgedgeError, match="permission denied"):
            write_atomic(ro / "report.json", "{}")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_write_atomic_text_and_bytes(tmp_path):
    write_atomic(tmp_path / "sub" / "report.json", "{}\n")
    write_atomic(tmp_path / "sub" / "timing.cache", b"\x00\x01")
    write_atomic(tmp_path / "sub" / "report.json", "{\"ok\": true}\n")
    assert (tmp_path / "sub" / "report.json").read_text() == "{\"ok\": true}\n"
    assert (tmp_path / "sub" / "timing.cache").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["report.json", "timing.cache"]


def test_write_atomic_cleans_temp_on_error(tmp_path, monkeypatch):
    def replace(a, b):
        raise OSError(errno.EROFS, "Read-only file system", str(b))

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(TgedgeError, match="report.json: read-only file system"):
        write_atomic(tmp_path / "report.json", "{}")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TgedgeError, match="is a directory"):
        write_atomic(tmp_path, "{}")


def test_inside(tmp_path):
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "images" / "a.png").write_bytes(b"")
    (tmp_path / "secret").write_text("x")
    (tmp_path / "d" / "link.png").symlink_to(tmp_path / "secret")
    d = tmp_path / "d"
    assert inside(d, "images/a.png", "f.json key") == (d / "images" / "a.png").resolve()
    for name, match in [("/etc/passwd", "is an absolute path"), ("../secret", "outside"),
                        ("images/../../secret", "outside"), ("link.png", "outside"), (".", "outside"),
                        ("", "expected a file name"), (3, "expected a file name"), ("a\x00b", "NUL")]:
        with pytest.raises(TgedgeError, match=f"^f.json key: .*{match}"):
            inside(d, name, "f.json key")


def test_fingerprint_sees_size_head_and_tail(tmp_path):
    from tgedge.fileio import fingerprint

    f = tmp_path / "g.onnx"
    data = bytearray(os.urandom(3 << 20))
    f.write_bytes(data)
    before = fingerprint(f)
    for at in (0, len(data) - 1):
        changed = bytearray(data)
        changed[at] ^= 1
        f.write_bytes(changed)
        assert fingerprint(f) != before
    f.write_bytes(data + b"\0")
    assert fingerprint(f) != before


def test_bad_numbers():
    from tgedge.config import bad_numbers

    tree = {"vision": {"max_abs": float("nan"), "ok": 1.0, "flag": True}, "graphs": {"a": [0.5, 1e30, float("-inf")]}}
    assert bad_numbers(tree) == ["vision.max_abs nan", "graphs.a[2] -inf"]
    assert bad_numbers(tree, "calibration.json", max_abs=1e6) == [
        "calibration.json.vision.max_abs nan", "calibration.json.graphs.a[1] 1e+30", "calibration.json.graphs.a[2] -inf"]


def test_a_served_repository_may_be_replaced(tmp_path):
    """tritonserver's Python caches the repository's model.py files beside them; that cache is derived from what
    tgedge wrote, so `tgedge triton -o REPO` still replaces the repository; other foreign files still refuse."""
    out = tmp_path / "repo"
    with atomic_dir(out, kind="repository") as tmp:
        (tmp / "tgedge" / "1").mkdir(parents=True)
        (tmp / "tgedge" / "1" / "model.py").write_text("x = 1\n")
    (out / "tgedge" / "1" / "__pycache__").mkdir()
    (out / "tgedge" / "1" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    assert check_output(out, kind="repository") == out.resolve()
    with pytest.raises(TgedgeError, match="not export"):
        check_output(out, kind="export")
    (out / "tgedge" / "1" / "notes.pyc").write_bytes(b"\0")  # not in a __pycache__: the user's
    with pytest.raises(TgedgeError, match=r"holds files tgedge did not write \(tgedge/1/notes.pyc\)"):
        check_output(out, kind="repository")
