import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))  # tiny.py: small models and files the tests build

import pytest  # noqa: E402

EVAL_SAMPLES = 50
CALIB_SAMPLES = 48  # the demo int8's calibration set (tests/calibration/test_quantize.py checks the count)

# The session fixtures below are built once and shared read-only: a test that edits one copies it first (each
# checks at the session's end that its files are as it wrote them).


def _state(directory: Path) -> dict:
    return {str(f.relative_to(directory)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _unchanged(written: dict) -> None:
    changed = [str(d) for d, state in written.items() if _state(d) != state]
    assert not changed, f"a test wrote into a shared session fixture: {changed}"


@pytest.fixture(scope="session")
def demo_export(tmp_path_factory):
    """The embedded demo model exported once for the session (fp32, onnxruntime-checked)."""
    from tgedge.export.onnx_export import export_model

    result = export_model("demo", tmp_path_factory.mktemp("export") / "demo")
    assert result.passed
    return result


@pytest.fixture(scope="session")
def demo_eval(tmp_path_factory):
    """The first EVAL_SAMPLES samples of the demo task's eval split, as a data folder."""
    from tgedge.data import shapes
    from tgedge.data.folder import write_folder

    return write_folder(shapes.generate(shapes.SPLIT_SEEDS["eval"], EVAL_SAMPLES),
                        tmp_path_factory.mktemp("data") / "eval")


@pytest.fixture(scope="session")
def demo_calib(tmp_path_factory):
    """The first CALIB_SAMPLES samples of the demo task's calibration split, as a data folder."""
    from tgedge.data import shapes
    from tgedge.data.folder import write_folder

    return write_folder(shapes.generate(shapes.SPLIT_SEEDS["calibration"], CALIB_SAMPLES),
                        tmp_path_factory.mktemp("calib") / "calibration")


@pytest.fixture(scope="session")
def demo_quantized(demo_export, demo_calib, tmp_path_factory):
    """`demo_quantized(precision)`: the session's demo export quantised to fp16, int8 (calibrated on demo_calib) or
    int4w, each built on first use and then shared (several test modules need the same three)."""
    from tgedge.calibration.quantize import quantize_export

    def get(precision: str):
        if precision not in made:
            made[precision] = quantize_export(demo_export.directory, tmp_path_factory.mktemp("q") / precision,
                                              precision, calib=demo_calib if precision == "int8" else None)
            written[made[precision].directory] = _state(made[precision].directory)
        return made[precision]
    made, written = {}, {}
    yield get
    _unchanged(written)


@pytest.fixture(scope="session")
def demo_static_exports(tmp_path_factory):
    """`demo_static_exports(mode, dtype="fp32")`: the demo exported with a static KV cache (`static` or
    `static-onnx`), checked against torch, each built on first use and then shared."""
    from tgedge.export.onnx_export import export_model

    def get(mode: str, dtype: str = "fp32"):
        if (mode, dtype) not in made:
            result = export_model("demo", tmp_path_factory.mktemp("static") / f"{mode}-{dtype}", cache_mode=mode,
                                  dtype=dtype)
            assert result.passed
            made[mode, dtype] = result
            written[result.directory] = _state(result.directory)
        return made[mode, dtype]
    made, written = {}, {}
    yield get
    _unchanged(written)


@pytest.fixture(scope="session")
def tg_tiny(tmp_path_factory):
    """The tg-tiny preset (original TG-LLaVA layout, random weights, its CLIP in DIR/clip), written once."""
    from tgedge.presets import write_random

    out = tmp_path_factory.mktemp("preset") / "tg-tiny"
    write_random("tg-tiny", out)
    written = {out: _state(out)}
    yield out
    _unchanged(written)


@pytest.fixture(scope="session")
def _peaks_once():
    return {}


@pytest.fixture
def peaks_measured_once(_peaks_once, monkeypatch):
    """The bench's host floors measured once for the session and reused by every bench run in a test that asks for
    this (a measurement is seconds of copies and matmuls, twice per run); test_bench_json measures for real each
    time, and tests/test_floors.py tests the measuring itself."""
    from tgedge import floors

    measure = floors.measure_peaks

    def once(device="cpu", threads=0):
        if (device, threads) not in _peaks_once:
            _peaks_once[device, threads] = measure(device, threads)
        return _peaks_once[device, threads]
    monkeypatch.setattr(floors, "measure_peaks", once)
