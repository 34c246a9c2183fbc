import pytest

from tgedge.fileio import atomic_dir, write_atomic


def test_failure_leaves_old_output_and_no_temp(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_atomic_text_and_bytes(tmp_path):
    write_atomic(tmp_path / "sub" / "report.json", "{}\n")
    write_atomic(tmp_path / "sub" / "timing.cache", b"\x00\x01")
    write_atomic(tmp_path / "sub" / "report.json", "{\"ok\": true}\n")
    assert (tmp_path / "sub" / "report.json").read_text() == "{\"ok\": true}\n"
    assert (tmp_path / "sub" / "timing.cache").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["report.json", "timing.cache"]
