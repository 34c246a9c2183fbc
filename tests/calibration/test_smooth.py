"""SmoothQuant (tgedge.calibration.smooth): which inputs it folds, that the smoothed fp32 graph computes the same
function, and that the per-channel maxima come from the streamed min/max pass."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tgedge.calibration.smooth import groups, scales, smooth


def _run(proto, feed):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def _feed(proto, rng, seq=3, past=2):
    """Inputs for any dims: a symbolic past/attention length is past (+ seq), every other symbolic dim seq."""
    feed = {}
    for i in proto.graph.input:
        dims = [d.dim_value or (past if "past" in d.dim_param and "key_values" in i.name else seq)
                for d in i.type.tensor_type.shape.dim]
        if i.name == "attention_mask":
            feed[i.name] = np.ones((dims[0], past + seq), np.int64)
        elif i.name == "position_ids":
            feed[i.name] = np.arange(past, past + seq, dtype=np.int64)[None].repeat(dims[0], 0)
        else:
            feed[i.name] = rng.standard_normal(dims).astype(np.float32)
    return feed


@pytest.mark.parametrize("graph,expected", [("decoder", {"gain": 6, "gated": 3}), ("vision", {"layernorm": 6})])
def test_groups_and_the_function_is_kept(graph, expected, demo_export):
    proto = onnx.load(str(demo_export.directory / f"{graph}.onnx"))
    found = groups(proto)
    kinds = {}
    for g in found:
        kinds[g.kind] = kinds.get(g.kind, 0) + 1
    assert kinds == expected  # per layer: q/k/v's norm, gate/up's norm, down's gated input; 2 LayerNorms (vision)
    rng = np.random.default_rng(0)
    feed = _feed(proto, rng)
    want = _run(proto, feed)
    absmax = {g.tensor: rng.uniform(0.01, 50.0, g.channels) for g in found}  # wide: outlier-like channels
    done = smooth(proto, absmax, 0.5)
    assert set(done) == set(absmax) and all(np.ptp(s) > 0 for s in done.values())
    got = _run(proto, feed)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * np.abs(w).max())


def test_scales_follow_smoothquant():
    """s_j = max|X_j|^a / max|W_j|^(1-a): a=1 moves all of X's scale into W, a=0 none of it (W's alone)."""
    w = np.array([[1.0, -2.0], [0.5, 0.1], [4.0, 0.0]])
    a = np.array([8.0, 2.0, 1.0])
    np.testing.assert_allclose(scales(a, [w], 1.0), a)
    np.testing.assert_allclose(scales(a, [w], 0.0), 1 / np.array([2.0, 0.5, 4.0]))
    np.testing.assert_allclose(scales(a, [w], 0.5), np.sqrt(a / np.array([2.0, 0.5, 4.0])))


def test_channel_maxima_are_measured_in_the_minmax_pass(demo_export, tmp_path):
    from tgedge.calibration.collect import collect_ranges
    from tgedge.calibration.convert import QUANT_OPS
    from tgedge.data import shapes
    from tgedge.data.folder import write_folder

    data = write_folder(shapes.generate(shapes.SPLIT_SEEDS["calibration"], 3), tmp_path / "calib")
    channels: dict = {}
    ranges = collect_ranges(demo_export.directory, data, ["decoder"], QUANT_OPS, channel_absmax=channels)
    proto = onnx.load(str(demo_export.directory / "decoder.onnx"), load_external_data=False)
    wanted = {g.tensor: g.channels for g in groups(proto)}
    assert set(channels["decoder"]) == set(wanted)
    for t, m in channels["decoder"].items():
        assert m.shape == (wanted[t],) and (m >= 0).all()
        # the per-tensor range is the largest channel's
        assert float(ranges["decoder"].data[t].highest[0]) == pytest.approx(m.max(), rel=1e-6)


def test_awq_scales_pick_the_exponent_with_the_least_error():
    """Outlier input channels: AWQ-style scales protect them; with flat statistics the exponent is irrelevant."""
    from tgedge.calibration.smooth import _rtn, awq_scales

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 16))
    m2 = np.ones(64)
    m2[:4] = 400.0  # 4 channels 20x the rest (rms)
    s, a = awq_scales(m2, [w], bits=4, block=32)
    assert a > 0 and s[:4].min() > s[4:].max()

    def err(scale):
        ws = w * scale[:, None]
        return float((m2 / scale ** 2) @ ((_rtn(ws, 4, 32) - ws) ** 2).sum(axis=1))

    assert err(s) < err(np.ones(64))


def test_quantize_records_and_refuses(demo_export, tmp_path):
    import json

    from tgedge.calibration.quantize import quantize_export
    from tgedge.data import shapes
    from tgedge.data.folder import write_folder
    from tgedge.errors import TgedgeError

    data = write_folder(shapes.generate(shapes.SPLIT_SEEDS["calibration"], 3), tmp_path / "calib")
    sq = quantize_export(demo_export.directory, tmp_path / "sq", "int8", data, smooth=0.5)
    saved = json.loads((tmp_path / "sq" / "calibration.json").read_text())
    assert saved["smooth"] == 0.5 and set(saved["channels"]) == {"text_guide", "vision", "fusion", "decoder"}
    assert "SmoothQuant" in sq.reports["decoder"].note
    plain = quantize_export(demo_export.directory, tmp_path / "plain", "int8", calibration=tmp_path / "sq" /
                            "calibration.json", smooth=None)  # the raw ranges, reused without smoothing
    assert "SmoothQuant" not in plain.reports["decoder"].note
    # --smooth auto (the default) smooths only the inputs with outlier channels: on the trained demo, some of the
    # gated MLPs' down-projection inputs (as in trained LLMs), not its norms' outputs (ratio ~2)
    from tgedge.calibration.smooth import with_outliers

    channels = {t: np.asarray(v) for t, v in saved["channels"]["decoder"].items()}
    spiky = with_outliers(channels)
    assert spiky and all("/mlp/" in t for t in spiky) and len(spiky) < len(channels)
    auto = quantize_export(demo_export.directory, tmp_path / "auto", "decoder=int8",
                           calibration=tmp_path / "sq" / "calibration.json")
    assert f"{len(spiky)} MatMul inputs smoothed (--smooth auto" in auto.reports["decoder"].note
    # one more planted in the saved maxima (a channel 100x the median of an even input) is smoothed too
    even = next(t for t in sorted(channels) if t not in spiky)
    planted = json.loads(json.dumps(saved))
    planted["channels"]["decoder"][even][3] = 100 * float(np.median(channels[even]))
    (tmp_path / "planted.json").write_text(json.dumps(planted))
    auto = quantize_export(demo_export.directory, tmp_path / "auto2", "decoder=int8", calibration=tmp_path /
                           "planted.json")
    assert f"{len(spiky) + 1} MatMul inputs smoothed (--smooth auto" in auto.reports["decoder"].note
    awq = quantize_export(demo_export.directory, tmp_path / "awq", "int4w", data, awq=True)
    assert "AWQ-style" in awq.reports["decoder"].note
    assert set(json.loads((tmp_path / "awq" / "calibration.json").read_text())["mean_sq"]) == {"decoder"}
    for kwargs, match in ((dict(precision="int8", calibration=tmp_path / "plain" / "calibration.json", smooth=0.5),
                           "no per-channel maxima"),
                          (dict(precision="int8", calib=data, smooth=1.5), r"--smooth must be in \[0, 1\]"),
                          (dict(precision="int8", calib=data, method="entropy", smooth=0.5), "needs --method minmax"),
                          (dict(precision="int8", calib=data, awq=True), "--awq scales weight-only graphs"),
                          (dict(precision="int4w", awq=True), "--awq needs calibration data")):
        with pytest.raises(TgedgeError, match=match):
            quantize_export(demo_export.directory, tmp_path / "x", **kwargs)
        assert not (tmp_path / "x").exists()


def test_auto_picks_inputs_with_outlier_channels():
    from tgedge.calibration.smooth import OUTLIER_RATIO, outlier_ratio, with_outliers

    even = np.full(64, 2.0)
    spiky = even.copy()
    spiky[[5, 40]] = 2.0 * 40  # two channels 40x the median: the realistic presets measure 30-60
    edge = even.copy()
    edge[7] = 2.0 * OUTLIER_RATIO * 0.99
    assert outlier_ratio(even) == 1.0 and outlier_ratio(spiky) == 40.0
    assert list(with_outliers({"even": even, "spiky": spiky, "edge": edge})) == ["spiky"]


def test_searched_alpha_undoes_planted_outliers_and_leaves_even_inputs():
    """A function-preserving outlier (channels of X 32x, the matching rows of W 32x smaller, as `checkpoint random`
    plants them) costs int8 bits in both roundings; the searched alpha migrates it back (close to the unplanted
    error), where SmoothQuant's fixed 0.5 only halves it. An input without outliers is left alone or nearly."""
    from tgedge.calibration.smooth import scales, search_scales, w8a8_error

    rng = np.random.default_rng(0)
    c, n = 256, 4000
    x = rng.standard_normal((n, c))
    w = rng.standard_normal((c, 64)) / np.sqrt(c)
    stats = lambda x: (np.abs(x).max(0), (x ** 2).mean(0))  # noqa: E731
    base = w8a8_error(*stats(x), [w], np.ones(c))
    xp, wp = x.copy(), w.copy()
    xp[:, :4] *= 32
    wp[:4] /= 32
    a, m2 = stats(xp)
    planted = w8a8_error(a, m2, [wp], np.ones(c))
    half = w8a8_error(a, m2, [wp], scales(a, [wp], 0.5))
    s, alpha = search_scales(a, m2, [wp])
    found = w8a8_error(a, m2, [wp], s)
    assert planted > 20 * base and found < half < planted and alpha >= 0.7 and found < 2 * base
    # the error estimate is the measured one: int8 of X/s times int8 of sW against XW on the same rows
    from tgedge.calibration.smooth import _int8_columns

    xs = xp / s
    step = np.abs(xs).max() / 127
    measured = ((np.round(xs / step) * step @ _int8_columns(wp * s[:, None]) - xp @ wp) ** 2).sum(1).mean()
    assert measured == pytest.approx(found, rel=0.15)
    s_even, alpha_even = search_scales(*stats(x), [w])
    assert s_even is None or w8a8_error(*stats(x), [w], s_even) <= base


def test_searched_fold_keeps_the_function(demo_export):
    from tgedge.calibration.smooth import searched

    proto = onnx.load(str(demo_export.directory / "decoder.onnx"))
    found = groups(proto)
    rng = np.random.default_rng(1)
    feed = _feed(proto, rng)
    want = _run(proto, feed)
    absmax = {g.tensor: rng.uniform(0.01, 50.0, g.channels) for g in found}
    mean_sq = {t: (a / 3) ** 2 for t, a in absmax.items()}
    done = searched(proto, absmax, mean_sq)
    assert done and all(0 <= alpha <= 1 for _, alpha in done.values())
    for g, w in zip(_run(proto, feed), want):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4 * np.abs(w).max())


def test_quantize_smooth_search(demo_export, tmp_path):
    """--smooth search: the per-channel mean squares are measured beside the maxima and saved; the saved file gives the
    same graph again; a file without them is refused for search in one line."""
    import json

    from tgedge.calibration.quantize import quantize_export
    from tgedge.data import shapes
    from tgedge.data.folder import write_folder
    from tgedge.errors import TgedgeError

    data = write_folder(shapes.generate(shapes.SPLIT_SEEDS["calibration"], 3), tmp_path / "calib")
    first = quantize_export(demo_export.directory, tmp_path / "s1", "decoder=int8", data, smooth="search")
    note = first.reports["decoder"].note
    assert "alpha searched per input (--smooth search)" in note and " of 9 MatMul inputs smoothed" in note
    saved = json.loads((tmp_path / "s1" / "calibration.json").read_text())
    assert saved["smooth"] == "search" and set(saved["mean_sq"]) == {"decoder"}
    again = quantize_export(demo_export.directory, tmp_path / "s2", "decoder=int8",
                            calibration=tmp_path / "s1" / "calibration.json", smooth="search")
    assert again.reports["decoder"].note == note
    assert (tmp_path / "s1" / "decoder.onnx").read_bytes() == (tmp_path / "s2" / "decoder.onnx").read_bytes()
    plain = dict(saved)
    del plain["mean_sq"]
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    with pytest.raises(TgedgeError, match="no per-channel statistics for --smooth search"):
        quantize_export(demo_export.directory, tmp_path / "x", "decoder=int8", calibration=tmp_path / "plain.json",
                        smooth="search")


def test_fused_rms_norm_gains_are_folded():
    """The static-cache decoder's norms are onnxruntime's SkipSimplifiedLayerNormalization (export/decoder_graph.py):
    its gain takes 1/s as the Mul by a gain does, and the function is kept (the 0.5 B decoder has 48 of them, which
    `groups` once missed: SmoothQuant and the per-channel statistics skipped every decoder norm)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(2)
    c, n = 16, 8
    gain = rng.uniform(0.5, 2.0, c).astype(np.float32)
    w = rng.standard_normal((c, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gain"], ["y", "", "", "sum"],
                          name="/layers.1/input_layernorm/Skip", domain="com.microsoft", epsilon=1e-6),
         helper.make_node("MatMul", ["y", "w"], ["out"], name="/layers.1/q/MatMul")],
        "g", [helper.make_tensor_value_info(i, TensorProto.FLOAT, [2, 3, c]) for i in ("x", "skip")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 3, n]),
         helper.make_tensor_value_info("sum", TensorProto.FLOAT, [2, 3, c])],
        [numpy_helper.from_array(gain, "gain"), numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    found = groups(proto)
    assert [(g.tensor, g.kind, g.fold) for g in found] == [("y", "gain", ["gain"])]
    feed = {"x": rng.standard_normal((2, 3, c)).astype(np.float32),
            "skip": rng.standard_normal((2, 3, c)).astype(np.float32)}
    want = _run(proto, feed)
    done = smooth(proto, {"y": rng.uniform(0.1, 40.0, c)}, 0.5)
    assert set(done) == {"y"}
    for g, w_ in zip(_run(proto, feed), want):
        np.testing.assert_allclose(g, w_, rtol=1e-4, atol=1e-4 * np.abs(w_).max())


def test_static_decoder_channels_are_all_measured(demo_static_exports, demo_calib, tmp_path):
    """The per-channel statistics reach every foldable input of the static-cache decoder (fused norms, onnxruntime's
    contrib ops, after which onnx's shape inference knows no ranks): measured before as 1 input of 9, so SmoothQuant
    and the outlier split left every norm but the first alone on the default real-scale export."""
    import json

    from tgedge.calibration.quantize import quantize_export

    export = demo_static_exports("static")
    found = groups(onnx.load(str(export.directory / "decoder.onnx"), load_external_data=False))
    assert len(found) == 9
    result = quantize_export(export.directory, tmp_path / "q", "decoder=int8", calib=demo_calib, calib_limit=4,
                             smooth=0.5)
    assert result.reports["decoder"].note == "SmoothQuant alpha 0.5: 9 MatMul inputs smoothed"
    channels = json.loads((tmp_path / "q" / "calibration.json").read_text())["channels"]["decoder"]
    assert set(channels) == {g.tensor for g in found}
    assert all(len(channels[g.tensor]) == g.channels for g in found)
