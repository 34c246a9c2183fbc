"""tgedge build with TensorRT for RTX (its builder runs without a GPU): every graph of the fp32, fp16 and
int8 exports parses and builds; engine metadata and the refusal of foreign engines are checked.

Running the engines needs an RTX-class GPU (compute 8.0/8.6/8.9/12.x); that is not tested here."""

import json

import pytest

from tgedge.cli import main
from tgedge.errors import TgedgeError
from tgedge.export.tensorrt_build import build_engines, profiles, trtexec_line
from tgedge.runtime.manifest import Manifest
from tgedge.runtime.tensorrt import check_engine

trt = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX wheels (tensorrt-rtx-cu13-*) not installed")


@pytest.fixture(scope="module")
def exports(demo_export, demo_quantized):
    """The session's exports (read-only: engines are written elsewhere)."""
    return {"fp32": demo_export.directory, **{p: demo_quantized(p).directory for p in ("fp16", "int8")}}


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_every_graph_builds(precision, exports, tmp_path):
    cache = tmp_path / "timing.cache"
    result = build_engines(exports[precision], tmp_path / "engines", "tensorrt_rtx", timing_cache=cache)
    m = Manifest.load(tmp_path / "engines")
    assert set(m.engines) == set(m.graphs)
    for graph, meta in m.engines.items():
        assert (tmp_path / "engines" / meta["file"]).stat().st_size > 1000
        assert meta["precision"] == precision if graph != "embed" or precision != "int8" else True
        assert meta["tensorrt_version"] == trt.__version__ and meta["strongly_typed"]
        assert meta["source_sha256"] == m.graphs[graph].sha256
        assert result.commands[graph].startswith("tensorrt_rtx --onnx=")
    assert m.engines["decoder"]["profiles"] == 2
    assert not cache.exists()  # TensorRT for RTX has no timing cache; TensorRT 10 writes one


def test_decoder_profiles_keep_total_equal_past_plus_sequence(demo_export):
    m = Manifest.load(demo_export.directory)
    for p in profiles(m, "decoder"):
        for k in range(3):
            assert p["total_sequence_length"][k] == p["past_sequence_length"][k] + p["sequence_length"][k]


def test_equivalent_command_lists_every_profile(demo_export):
    m = Manifest.load(demo_export.directory)
    line = trtexec_line("tensorrt", m, "decoder", "decoder.engine", 1024, None).split()
    assert line[0] == "trtexec" and [a for a in line if a.startswith("--profile")] == ["--profile=0", "--profile=1"]
    decode_min = line[line.index("--profile=1") + 1]
    assert decode_min.startswith("--minShapes=inputs_embeds:1x1x") and "past_key_values.0.key:1x2x1x" in decode_min
    vision = trtexec_line("tensorrt", m, "vision", "vision.engine", 1024, None)
    assert "--profile" not in vision and vision.count("--minShapes=pixel_values:") == 1


def test_weight_only_int4_is_refused_with_the_reason(demo_quantized, tmp_path):
    int4 = demo_quantized("int4w").directory
    with pytest.raises(TgedgeError, match="MatMulNBits is not a TensorRT op"):
        build_engines(int4, tmp_path / "e", "tensorrt_rtx", graphs=["decoder"])
    assert not (tmp_path / "e").exists()


def test_build_cli_json(demo_export, tmp_path, capsys):
    assert main(["build", str(demo_export.directory), "-o", str(tmp_path / "e"), "--backend", "tensorrt_rtx",
                 "--graph", "vision", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["engines"]) == ["vision"] and "--stronglyTyped" in out["commands"]["vision"]


META = {"backend": "tensorrt", "tensorrt_version": "10.3.0", "gpu": "Orin", "compute_capability": "8.7"}


def test_engine_from_another_version_or_gpu_is_refused():
    check_engine("vision", META, "10.3.0", {"name": "Orin", "compute_capability": "8.7"})  # same: accepted
    with pytest.raises(TgedgeError, match=r"built on Orin \(compute 8.7\) with tensorrt 10.3.0; this machine has "
                                          r"Orin \(compute 8.7\) with 10.7.0: TensorRT versions differ"):
        check_engine("vision", META, "10.7.0", {"name": "Orin", "compute_capability": "8.7"})
    with pytest.raises(TgedgeError, match="not portable across GPUs"):
        check_engine("vision", META, "10.3.0", {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"})
    with pytest.raises(TgedgeError, match="needs a GPU; this machine has no GPU"):
        check_engine("vision", META, "10.3.0", {})


def test_tensorrt_backend_without_engines_or_gpu(demo_export, tmp_path, capsys):
    from tgedge.runtime.pipeline import Pipeline

    with pytest.raises(TgedgeError, match="no TensorRT engine for"):
        Pipeline(demo_export.directory, "tensorrt")
    build_engines(demo_export.directory, tmp_path / "e", "tensorrt_rtx")
    with pytest.raises(TgedgeError, match="cuda-python|needs a GPU"):
        Pipeline(tmp_path / "e", "tensorrt")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_static_onnx_decoder_builds_on_tensorrts_cache_update_and_attention_layers(dtype, demo_static_exports,
                                                                                     tmp_path):
    """The static cache in standard ops: TensorRT's parser turns each TensorScatter into a KVCacheUpdate layer (the
    in-place write) and each Attention into an attention layer, and the decoder builds (fp32 too: those layers are
    marked decomposable, without which TensorRT for RTX refuses fp32 attention)."""
    export = demo_static_exports("static-onnx", dtype)
    layers = export.manifest.model["decoder"]["num_layers"]
    logger = trt.Logger(trt.Logger.INTERNAL_ERROR)
    network = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse_from_file(str(export.directory / "decoder.onnx"))
    kinds = [network.get_layer(i).type for i in range(network.num_layers)]
    assert kinds.count(trt.LayerType.KV_CACHE_UPDATE) == 2 * layers
    assert kinds.count(trt.LayerType.ATTENTION_INPUT) == layers
    build_engines(export.directory, tmp_path / "engines", "tensorrt_rtx", graphs=["decoder"])
    meta = Manifest.load(tmp_path / "engines").engines["decoder"]
    assert meta["attention_layers"] == layers and meta["precision"] == dtype and meta["profiles"] == 2
    assert (tmp_path / "engines" / meta["file"]).stat().st_size > 1000


def test_batched_engines_decode_max_batch_sequences(demo_static_exports, tmp_path):
    """tgedge build --max-batch N: the decoder's decode profile takes 1..N sequences (optimised for N), its prefill
    one (the scheduler prefills a newcomer alone), vision N images' views; the engine records N, which the runtime's
    batched cache and tgedge triton read."""
    export = demo_static_exports("static-onnx")
    m = export.manifest
    prefill, decode = profiles(m, "decoder", 4)
    assert prefill["batch_size"] == (1, 1, 1) and decode["batch_size"] == (1, 4, 4)
    assert [p["batch_size"] for p in profiles(m, "decoder")] == [(1, 1, 1), (1, 1, 1)]  # default: one sequence
    views = m.contract.dims["num_views"]["max"]
    assert profiles(m, "vision", 4)[0]["num_views"][2] == 4 * views
    line = trtexec_line("tensorrt_rtx", m, "decoder", "decoder.engine", 1024, None, max_batch=4)
    assert "--maxShapes=inputs_embeds:4x1x" in line and "past_key_values.0.key:4x" in line
    build_engines(export.directory, tmp_path / "e", "tensorrt_rtx", graphs=["decoder"], max_batch=4)
    assert Manifest.load(tmp_path / "e").engines["decoder"]["max_batch"] == 4
    with pytest.raises(TgedgeError, match="--max-batch must be an integer >= 1"):
        build_engines(export.directory, tmp_path / "f", "tensorrt_rtx", max_batch=0)


def test_the_onnxruntime_static_decoder_is_refused_naming_the_target(demo_static_exports, tmp_path, capsys):
    export = demo_static_exports("static")
    assert main(["build", str(export.directory), "-o", str(tmp_path / "e"), "--backend", "tensorrt_rtx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GroupQueryAttention" in err and "--target tensorrt" in err
    assert not (tmp_path / "e").exists()
