"""Outlier channels in fp32 beside the int8 MatMuls (tgedge.calibration.outliers, `quantize --outlier-channels fp32`):
which channels it takes, that the split fp32 graph computes the same function, and that on the demo with planted
outlier channels it brings int8 back where per-tensor int8 alone loses them."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tgedge.calibration.outliers import MAX_SHARE, outlier_channels, regular_ranges, split
from tgedge.calibration.smooth import OUTLIER_RATIO, groups


def test_outlier_channels_are_the_few_largest():
    a = np.full(64, 2.0)
    assert outlier_channels(a).size == 0
    a[[5, 40]] = 2.0 * 32
    a[7] = 2.0 * OUTLIER_RATIO * 0.99  # just under the rule
    assert outlier_channels(a).tolist() == [5, 40]
    many = np.full(256, 1.0)
    many[:64] = np.linspace(10, 20, 64)  # a quarter of the channels: only the largest 1/16 go fp32
    got = outlier_channels(many)
    assert got.size == int(256 * MAX_SHARE) and set(got) == set(range(64 - got.size, 64))


def _graph(rng, c=32, n=(24, 40)):
    """RMSNorm's gain Mul -> X read by two MatMuls (q/k/v-like), channels 3 and 17 planted 32x."""
    gain = rng.uniform(0.5, 1.5, c).astype(np.float32)
    gain[[3, 17]] *= 32
    weights = [rng.standard_normal((c, k)).astype(np.float32) / np.sqrt(c) for k in n]
    nodes = [helper.make_node("Mul", ["h", "gain"], ["x"], name="/norm/Mul")]
    nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"/proj{i}/MatMul") for i in range(len(n))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 5, c])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 5, k])
                               for i, k in enumerate(n)],
                              [numpy_helper.from_array(gain, "gain")] +
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), gain


def _run(proto, feed):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_split_keeps_the_function_and_takes_the_outlier_rows():
    rng = np.random.default_rng(0)
    proto, gain = _graph(rng)
    feed = {"h": rng.standard_normal((2, 5, 32)).astype(np.float32)}
    want = _run(proto, feed)
    absmax = {"x": np.abs(feed["h"] * gain).reshape(-1, 32).max(0)}
    done = split(proto, absmax)
    assert list(done) == ["x"] and done["x"].channels == [3, 17]
    assert done["x"].fp32_nodes == ["/proj0/MatMul_outlier_channels", "/proj1/MatMul_outlier_channels"]
    onnx.checker.check_model(proto)
    for got, w in zip(_run(proto, feed), want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert not inits["w0"][[3, 17]].any() and inits["w0_outlier_rows"].shape == (2, 24)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Gather") == 1 and ops.count("MatMul") == 4 and ops.count("Add") == 2
    # the quantised MatMuls read the regular channels, whose range is theirs alone
    assert {n.input[0] for n in proto.graph.node if n.name in ("/proj0/MatMul", "/proj1/MatMul")} == {"x_regular"}
    assert regular_ranges(done, absmax)["x_regular"] == pytest.approx(np.delete(absmax["x"], [3, 17]).max())
    assert groups(proto)[0].tensor == "x_regular"  # SmoothQuant may still fold into the mask
    # an input without outliers, or one whose MatMul stays fp32, is left as it was
    even, _ = _graph(rng)
    assert split(even, {"x": np.ones(32)}) == {} and split(even, absmax, skip={"/proj1/MatMul"}) == {}


def _planted(src, out):
    """The demo export with the decoder's norm outputs' first 4 channels 32x and the matching weight rows 32x smaller
    (the same function, as `tgedge checkpoint random` plants outliers; exact in float: a power of two)."""
    shutil.copytree(src, out)
    proto = onnx.load(str(out / "decoder.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    planted = 0
    for g in groups(proto):
        if g.kind != "gain":
            continue
        for name, factor in [(g.fold[0], 32.0)] + [(w, 1 / 32) for _, w in g.matmuls]:
            a = numpy_helper.to_array(inits[name]).copy()
            a[:4] *= factor
            inits[name].CopyFrom(numpy_helper.from_array(a, name))
        planted += 1
    assert planted == 6  # 3 layers x (q/k/v's norm, gate/up's norm)
    onnx.save(proto, str(out / "decoder.onnx"))
    return out


@pytest.fixture(scope="module")
def planted_runs(demo_export, tmp_path_factory):
    from tgedge.calibration.quantize import quantize_export
    from tgedge.data import shapes
    from tgedge.data.folder import write_folder
    from tgedge.validate import validate

    root = tmp_path_factory.mktemp("planted")
    calib = write_folder(shapes.generate(shapes.SPLIT_SEEDS["calibration"], 8), root / "calib")
    data = write_folder(shapes.generate(shapes.SPLIT_SEEDS["eval"], 8), root / "eval")
    src = _planted(demo_export.directory, root / "export")
    runs = {}
    for name, kwargs in (("int8", {"smooth": None}), ("split", {"smooth": None, "outlier_channels": "fp32"})):
        result = quantize_export(src, root / name, "decoder=int8", calib=calib, verify=False, **kwargs)
        report = validate(result.directory, data, limit=8, show_progress=False)
        runs[name] = (result, next(s for s in report.stages if s.name == "decoder").figures)
    return root, runs


def test_split_brings_int8_back_on_planted_outliers(planted_runs):
    """Per-tensor int8 spends its range on the planted channels; with them in fp32 the decoder's next-token
    distributions come back (measured here, 8 calibration and 8 eval samples: KL max 0.141 -> 0.00036, KL mean 0.011 ->
    4.5e-5, top-1 0.94 -> 1.0, mean |logit error| 0.096 -> 0.050, min cosine 0.9966 -> 0.9981)."""
    root, runs = planted_runs
    (_, plain), (split_result, split_figures) = runs["int8"], runs["split"]
    assert split_figures["kl_max"] < plain["kl_max"] / 10 and split_figures["kl_mean"] < plain["kl_mean"] / 10
    assert split_figures["top1"] == 1.0 > plain["top1"]
    assert split_figures["mean_abs"] < plain["mean_abs"] / 1.5 and split_figures["min_cosine"] > plain["min_cosine"]
    note = split_result.reports["decoder"].note
    assert note.startswith("outlier channels in fp32 (--outlier-channels fp32): 9 MatMul inputs")
    proto = onnx.load(str(root / "split" / "decoder.onnx"))
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    fp32 = [n for n in proto.graph.node if n.name.endswith("_outlier_channels")]
    assert len(fp32) == 18 and not any(i in dq for n in fp32 for i in n.input)  # 3 x (q, k, v, gate, up, down)
    assert set(split_result.reports["decoder"].fp32_nodes) >= {n.name for n in fp32}


def test_split_reuses_and_refuses_saved_ranges(planted_runs):
    from tgedge.calibration.quantize import quantize_export
    from tgedge.errors import TgedgeError

    root, _ = planted_runs
    again = quantize_export(root / "export", root / "again", "decoder=int8", verify=False, smooth=None,
                            calibration=root / "split" / "calibration.json", outlier_channels="fp32")
    assert (root / "again" / "decoder.onnx").read_bytes() == (root / "split" / "decoder.onnx").read_bytes()
    assert again.reports["decoder"].note == json.loads((root / "split" / "manifest.json").read_text())[
        "quantization"]["graphs"]["decoder"]["note"]
    with pytest.raises(TgedgeError, match=r"no per-channel maxima for --outlier-channels fp32 .*"
                                          r"--outlier-channels int8"):
        quantize_export(root / "export", root / "x", "decoder=int8", verify=False, smooth=None,
                        calibration=root / "int8" / "calibration.json", outlier_channels="fp32")
    assert not (root / "x").exists()
    with pytest.raises(TgedgeError, match="--outlier-channels fp32 splits int8 and weight-only graphs' MatMuls"):
        quantize_export(root / "export", root / "x", "fp16", verify=False, outlier_channels="fp32")
    with pytest.raises(TgedgeError, match="--outlier-channels must be int8 or fp32"):
        quantize_export(root / "export", root / "x", "int8", verify=False, outlier_channels="fp16")


def test_split_helps_int4w_on_planted_outliers(planted_runs):
    """int4w (MatMulNBits, accuracy level 4: the activations too are rounded to int8 per block of 32 input channels)
    loses the planted channels' blocks; with the outlier channels in fp32 the logits come back (measured on 16 eval
    samples: min cosine 0.9937 -> 0.9992, mean |logit error| 0.109 -> 0.066)."""
    from tgedge.calibration.quantize import quantize_export
    from tgedge.validate import validate

    root, _ = planted_runs
    figures = {}
    for name, kwargs in (("int4w", {}), ("int4w-split", {"outlier_channels": "fp32", "calib": root / "calib"})):
        result = quantize_export(root / "export", root / name, "int4w", verify=False, **kwargs)
        report = validate(result.directory, root / "eval", limit=8, show_progress=False)
        figures[name] = next(s for s in report.stages if s.name == "decoder").figures
    plain, split_ = figures["int4w"], figures["int4w-split"]
    assert 1 - split_["min_cosine"] < (1 - plain["min_cosine"]) / 3 and split_["mean_abs"] < plain["mean_abs"] / 1.3
    note = result.reports["decoder"].note
    assert note.startswith("block 32, accuracy level 4") and "outlier channels in fp32" in note
    assert json.loads((root / "int4w-split" / "calibration.json").read_text())["channels"]["decoder"]
    proto = onnx.load(str(root / "int4w-split" / "decoder.onnx"))
    assert {n.op_type for n in proto.graph.node if n.name.endswith("_outlier_channels")} == {"MatMul"}
