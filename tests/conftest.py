import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))  # tiny.py: small models and files the tests build

import pytest  # noqa: E402

EVAL_SAMPLES = 50


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
