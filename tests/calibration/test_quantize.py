"""tgedge quantize: fp16 / int8 / int4w exports of the demo model validate within their policies."""

import json

import onnx
import pytest

from tgedge.calibration.quantize import parse_precision, quantize_export
from tgedge.cli import main
from tgedge.data.folder import read_folder
from tgedge.errors import TgedgeError
from tgedge.validate import validate

CALIB_SAMPLES = 48
CHECK_SAMPLES = 30


@pytest.fixture(scope="module")
def calib(demo_calib):
    assert len(read_folder(demo_calib)) == CALIB_SAMPLES  # the session's calibration split (tests/conftest.py)
    return demo_calib


@pytest.fixture(scope="module")
def int8(demo_quantized, calib):
    return demo_quantized("int8")  # the session's, calibrated on calib


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_int8_is_qdq_as_tensorrt_wants_it(int8):
    m = int8.manifest
    for graph in ("text_guide", "vision", "fusion", "decoder"):
        proto = onnx.load(str(m.graph_path(graph)))
        nodes = list(proto.graph.node)
        q = [n for n in nodes if n.op_type == "QuantizeLinear"]
        dq = [n for n in nodes if n.op_type == "DequantizeLinear"]
        assert q and dq and m.graphs[graph].precision == "int8"
        inits = {t.name: t for t in proto.graph.initializer}
        for n in dq:  # symmetric: every zero point is 0; weights int8 per channel (a scale per output channel)
            zp = inits.get(n.input[2]) if len(n.input) > 2 else None
            assert zp is None or not any(onnx.numpy_helper.to_array(zp).ravel())
            assert inits[n.input[0]].data_type == onnx.TensorProto.INT8 if n.input[0] in inits else True
        per_channel = [n for n in dq if n.input[0] in inits and len(inits[n.input[1]].dims) == 1]
        assert per_channel, graph
        # every quantised MatMul/Conv/Gemm reads a DequantizeLinear output
        assert int8.reports[graph].quantized_nodes
    assert "no MatMul" in int8.reports["embed"].note  # a Gather only: it stays fp32, said so


def _reads_dequantized(proto) -> set[str]:
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in proto.graph.node if any(i in dq for i in n.input)}


def test_int8_keeps_attention_products_fp32_unless_asked(int8, demo_export, tmp_path):
    """The MatMuls between two activations (attention's Q K^T and P V) stay fp32 by default; --int8-attention
    quantises them too."""
    from tgedge.calibration.convert import activation_products

    source = onnx.load(str(demo_export.manifest.graph_path("decoder")))
    products = activation_products(source)
    assert len(products) == 2 * demo_export.manifest.model["decoder"]["num_layers"]  # two per layer
    dequantized = _reads_dequantized(onnx.load(str(int8.manifest.graph_path("decoder"))))
    assert dequantized and not set(products) & dequantized
    assert set(products) <= set(int8.reports["decoder"].fp32_nodes)
    every = quantize_export(demo_export.directory, tmp_path / "every", "int8", int8_attention=True,
                            calibration=int8.directory / "calibration.json")
    assert set(products) <= _reads_dequantized(onnx.load(str(every.manifest.graph_path("decoder"))))
    assert every.manifest.quantization["int8_attention"] is True


def test_int8_validates_within_two_points(int8, demo_eval):
    report = validate(int8.directory, demo_eval, limit=CHECK_SAMPLES, show_progress=False)
    assert report.passed, report.summary()
    acc = next(s for s in report.stages if s.name == "accuracy").figures
    assert acc["drop_points"] <= 2.0 and acc["runtime"] >= 0.85


@pytest.mark.parametrize("precision", ["fp16", "int4w"])
def test_fp16_and_int4w_validate(precision, demo_quantized, demo_eval):
    result = demo_quantized(precision)
    m = result.manifest
    if precision == "fp16":
        ops = _ops(m.graph_path("decoder"))
        assert "Cast" in ops and all(g.precision == "fp16" for g in m.graphs.values())
        dec = onnx.load(str(m.graph_path("decoder")))
        assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in dec.graph.initializer)
        assert {"/norm", "/lm_head"} <= set(m.quantization["graphs"]["decoder"]["fp32_modules"])
    else:
        assert _ops(m.graph_path("decoder")).count("MatMulNBits") == len(result.reports["decoder"].quantized_nodes) > 0
        assert m.graphs["vision"].precision == "fp32"
    report = validate(result.directory, demo_eval, limit=CHECK_SAMPLES, show_progress=False)
    assert report.passed, report.summary()


def test_calibration_is_deterministic_and_reusable(int8, demo_export, calib, tmp_path):
    again = quantize_export(demo_export.directory, tmp_path / "again", "int8", calib=calib)
    first = (int8.directory / "calibration.json").read_text()
    assert (again.directory / "calibration.json").read_text() == first
    saved = json.loads(first)
    assert saved["method"] == "minmax" and saved["data"]["samples"] == CALIB_SAMPLES
    reused = quantize_export(demo_export.directory, tmp_path / "reused", "int8",
                             calibration=int8.directory / "calibration.json")
    for graph in ("vision", "decoder"):
        assert (reused.directory / f"{graph}.onnx").read_bytes() == (int8.directory / f"{graph}.onnx").read_bytes()


def test_streamed_ranges_are_onnxruntimes(demo_export, calib, tmp_path):
    """Min/max folded while the samples run (nothing kept) = onnxruntime's strided min/max over recorded feeds."""
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    from tgedge.calibration.collect import FeedReader, collect, collect_ranges
    from tgedge.calibration.convert import QUANT_OPS
    from tgedge.runtime.manifest import Manifest

    manifest, graphs = Manifest.load(demo_export.directory), ["vision", "decoder"]
    streamed = collect_ranges(demo_export.directory, calib, graphs, QUANT_OPS, limit=6)
    feeds = collect(demo_export.directory, calib, limit=6)
    for graph in graphs:
        calibrator = create_calibrator(manifest.graph_path(graph), list(QUANT_OPS),
                                       augmented_model_path=str(tmp_path / f"{graph}.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax, extra_options={"symmetric": True})
        reader = FeedReader(feeds[graph])
        for i in range(len(reader)):
            reader.set_range(i, i + 1)
            calibrator.collect_data(reader)
        expected = calibrator.compute_data()
        assert set(streamed[graph]) == set(expected) and len(set(expected)) > 10, graph
        # every reduction runs right after the node that makes its tensor (not at the end, which would keep every
        # measured activation alive until then)
        from tgedge.calibration.ranges import calibrated_tensors, with_reductions

        structure = onnx.load(str(manifest.graph_path(graph)), load_external_data=False)
        tensors = calibrated_tensors(structure, QUANT_OPS)
        nodes = list(with_reductions(structure, tensors).graph.node)
        made = {o: k for k, n in enumerate(nodes) for o in n.output}
        for k, n in enumerate(nodes):
            if n.op_type in ("ReduceMin", "ReduceMax"):
                assert made.get(n.input[0], -1) >= k - 2, n.name  # after its producer and its twin only
        # the same numbers up to float rounding: the graphs run in other sessions (other node fusions around the
        # added outputs) and the vision tower ran its 5 views as one batch here, one by one there
        for tensor in expected:
            assert np.allclose(streamed[graph][tensor].range_value, expected[tensor].range_value, rtol=1e-5, atol=0), \
                tensor


def test_precision_specs():
    graphs = ["text_guide", "vision", "fusion", "embed", "decoder"]
    assert {g: p.name for g, p in parse_precision("int4w", graphs).items()} == {**{g: "fp32" for g in graphs},
                                                                                 "decoder": "int4w"}
    assert parse_precision("vision=fp16, decoder=int8", graphs)["vision"].name == "fp16"
    with pytest.raises(TgedgeError, match="unknown precision 'int3'"):
        parse_precision("int3", graphs)
    with pytest.raises(TgedgeError, match="unknown graph 'visoin'"):
        parse_precision("visoin=fp16", graphs)
    with pytest.raises(TgedgeError, match=r"--precision names decoder twice \(decoder=int4w, decoder=fp16\): give each"):
        parse_precision("decoder=int4w, vision=fp16,decoder=fp16", graphs)


def test_calib_and_calibration_conflict(demo_export, tmp_path):
    with pytest.raises(TgedgeError, match="--calib and --calibration conflict"):
        quantize_export(demo_export.directory, tmp_path / "q", "int8", calib=tmp_path, calibration=tmp_path / "c.json")
    assert not (tmp_path / "q").exists()


def test_bad_input(demo_export, tmp_path, capsys):
    assert main(["quantize", str(demo_export.directory), "--precision", "int8", "-o", str(tmp_path / "x")]) == 2
    assert "int8 needs calibration data" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["quantize", str(demo_export.directory), "--precision", "int8", "--calib", str(tmp_path / "empty"),
                 "-o", str(tmp_path / "y")]) == 2
    assert "no samples.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert main(["quantize", str(demo_export.directory), "--precision", "fp16", "--exclude", "/nothing/*",
                 "-o", str(tmp_path / "z"), "--json"]) == 2
    assert "--exclude '/nothing/*' matches no node" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
