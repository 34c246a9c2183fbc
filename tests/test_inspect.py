"""tgedge inspect: counts checked against the graphs themselves for fp32, fp16, int8 and int4w exports."""

import json
import shutil

import onnx
import pytest

from tgedge.cli import main
from tiny import JETSON
from tgedge.errors import TgedgeError
from tgedge.inspection import inspect_export, inspect_onnx, inspect_path, summarize_layers

DATA = JETSON


@pytest.fixture(scope="module")
def exports(demo_export, demo_quantized):
    """The session's exports, read-only: a test that edits one copies it."""
    return {"fp32": demo_export.directory, **{p: demo_quantized(p).directory for p in ("fp16", "int8", "int4w")}}


def _wrapped(path):
    proto = onnx.load(str(path))
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(1 for n in proto.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and any(i in dq for i in n.input))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4w"])
def test_counts_match_the_graphs(precision, exports):
    report = inspect_export(exports[precision])
    manifest = json.loads((exports[precision] / "manifest.json").read_text())
    assert report["mismatches"] == []
    for name, g in report["graphs"].items():
        path = exports[precision] / f"{name}.onnx"
        proto = onnx.load(str(path))
        assert sum(g["ops"].values()) == len(proto.graph.node)
        assert g["qdq_wrapped"] == _wrapped(path)
        assert g["matmul_nbits"] == sum(n.op_type == "MatMulNBits" for n in proto.graph.node)
        assert [t["name"] for t in g["inputs"]] == [i.name for i in proto.graph.input]
        assert g["precision"] == manifest["graphs"][name]["precision"]
        quantized = manifest.get("quantization", {}).get("graphs", {}).get(name, {}).get("quantized_nodes")
        if precision == "int8" and quantized is not None:
            assert g["qdq_wrapped"] == quantized  # what quantize says it did is what the graph holds
        if precision == "int4w" and name == "decoder":
            assert g["matmul_nbits"] == quantized > 0 and g["params"].get("int4", 0) > 0
        if precision == "fp16" and name == "decoder":
            assert g["fp32_islands"].get("Softmax") and g["params"].get("float16")
    mem = report["memory"]
    assert mem["kv_cache_bytes"] > 0 and all(d["fits"] for d in mem["devices"].values())


def test_weights_shrink_with_precision(exports):
    size = {p: inspect_export(d)["memory"]["weights_bytes"] for p, d in exports.items()}
    assert size["fp16"] < 0.6 * size["fp32"] and size["int8"] < 0.5 * size["fp32"] and size["int4w"] < size["fp32"]


def test_mismatch_is_reported(exports, tmp_path, capsys):
    d = tmp_path / "edited"
    shutil.copytree(exports["fp32"], d)
    proto = onnx.load(str(d / "embed.onnx"))
    proto.graph.input[0].name = "ids"
    proto.graph.node[0].input[:] = ["ids" if i == "input_ids" else i for i in proto.graph.node[0].input]
    onnx.save(proto, str(d / "embed.onnx"))
    assert main(["inspect", str(d)]) == 1
    out = capsys.readouterr().out
    assert "mismatch" in out and "embed inputs differ from manifest.json" in out
    assert "input_ids int64 shape" in out and "ids int64 shape" in out


def test_engine_inspector_json():
    summary = summarize_layers(json.loads((DATA / "engine_inspector.json").read_text()))
    assert summary["layers"] == 3 and summary["precisions"] == {"FP16": 1, "Int8": 1, "FP32": 1}
    assert summary["per_layer"][1]["tactic"].startswith("sm87_xmma_gemm_i8i8")


def test_bad_input(tmp_path, exports):
    (tmp_path / "notes.onnx").write_text("hello")
    with pytest.raises(TgedgeError, match="not an ONNX model, or truncated"):
        inspect_onnx(tmp_path / "notes.onnx")
    data = (exports["fp32"] / "vision.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(TgedgeError, match="not an ONNX model, or truncated"):
        inspect_path(tmp_path / "cut.onnx")
    (tmp_path / "x.engine").write_bytes(b"\0" * 10)
    with pytest.raises(TgedgeError, match="not a TensorRT engine, or truncated"):
        inspect_path(tmp_path / "x.engine")
    broken = tmp_path / "broken"
    shutil.copytree(exports["fp32"], broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(TgedgeError, match="graph 'decoder' is missing"):
        inspect_path(broken)


def test_cli_json(exports, capsys):
    assert main(["inspect", str(exports["int8"] / "vision.onnx"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    # every compute op with a weight is wrapped in Q/DQ; attention's activation-by-activation MatMuls stay fp32
    from tgedge.calibration.convert import activation_products

    products = activation_products(onnx.load(str(exports["fp32"] / "vision.onnx"), load_external_data=False))
    assert r["kind"] == "onnx" and r["precision"] == "int8" and products
    assert r["qdq_wrapped"] == r["compute_ops"] - len(products)


def test_manifest_opset_other_than_the_graphs_is_reported(exports, tmp_path, capsys):
    """A manifest that claims another opset than its graphs import (probe 3: opset 99 passed) is a mismatch."""
    d = tmp_path / "opset"
    shutil.copytree(exports["fp32"], d)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["opset"] = 99
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(d)]) == 1
    assert "vision: manifest.json says opset 99, vision.onnx imports opset 17" in " ".join(capsys.readouterr().out.split())
