"""Export at scale, tested small: the `tg-tiny` preset (a real-architecture TG-LLaVA of the original layout, random
weights) exported with external data as a 7 B model is. Weights are read one graph at a time, the tied table is
stored once, the checks judge by relative error, and the streamed int4w decoder is onnxruntime's own quantisation."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tgedge.export.onnx_export import check_graph, export_model
from tgedge.export.specs import graph_specs
from tgedge.precision import REFERENCE
from tgedge.reference import TorchPipeline
from tgedge.runtime.manifest import Manifest
from tgedge.runtime.pipeline import Pipeline
from tgedge.weights import LazyWeights


@pytest.fixture(scope="module")
def tiny(tg_tiny):
    return tg_tiny  # the session's preset checkpoint, read-only


@pytest.fixture(scope="module")
def reads(tiny, tmp_path_factory):
    """Export with external data everywhere, counting how often each checkpoint tensor is read."""
    counts: Counter = Counter()
    original = LazyWeights.raw

    def counting(self, name):
        counts[name] += 1
        return original(self, name)

    mp = pytest.MonkeyPatch()
    mp.setattr(LazyWeights, "raw", counting)
    try:
        result = export_model(tiny, tmp_path_factory.mktemp("export") / "e", clip=tiny / "clip", external_data=True)
    finally:
        mp.undo()
    return result, counts


def test_every_graph_passes_and_keeps_external_data(reads):
    result, _ = reads
    assert result.passed and not any(c.skipped for c in result.checks)
    m = Manifest.load(result.directory)
    for name, entry in m.graphs.items():
        assert entry.external_data == f"{entry.file}.data" and (m.directory / entry.external_data).exists(), name
    assert max(c.rel_l2 for c in result.checks) < 1e-4  # fp32: relative error, not an absolute bound


def test_the_tied_table_is_stored_once(reads):
    result, _ = reads
    m = Manifest.load(result.directory)
    assert m.model["decoder"]["tie_word_embeddings"]
    assert m.graphs["decoder"].shared_data == ["embed.onnx.data"]
    vocab, width = m.model["decoder"]["vocab_size"], m.model["decoder"]["hidden_size"]
    table = (m.directory / "embed.onnx.data").stat().st_size
    assert table >= vocab * width * 4
    decoder = onnx.load(str(m.graph_path("decoder")), load_external_data=False)
    locations = Counter(e.value for t in decoder.graph.initializer for e in t.external_data if e.key == "location")
    assert locations["embed.onnx.data"] == 1  # the LM head's Gemm reads the embed graph's bytes
    assert m.graph_files("decoder")[-1].name == "embed.onnx.data"  # and the gate hashes them with the decoder


def test_each_tensor_is_read_a_bounded_number_of_times(reads):
    """Each read is one tensor, dropped after use: the finite-values check at load, writing (or tracing) its graph,
    checking it; the tied table once more, for the decoder's check (the LM head reads it)."""
    _, counts = reads
    tied = "language_model.embed_tokens.weight"
    assert counts[tied] == 4, counts[tied]
    assert max(v for k, v in counts.items() if k != tied) == 3, counts.most_common(3)


def test_runtime_tokens_equal_torch(reads, tiny, tmp_path):
    from tgedge.demo import shapes_image

    result, _ = reads
    image = shapes_image(tmp_path / "i.png")
    ref = TorchPipeline.from_checkpoint(tiny, tiny / "clip")
    want = ref.answer(image, "What color is the circle?", ref.options(max_new_tokens=6)).tokens
    with Pipeline(result.directory) as rt:
        got = rt.answer(image, "What color is the circle?", rt.options(max_new_tokens=6)).tokens
    assert got == want and len(want) >= 2


def test_a_planted_defect_fails_the_relative_check(reads, tiny):
    from tgedge.checkpoint import load_model

    result, _ = reads
    m = Manifest.load(result.directory)
    path = m.graph_path("decoder")
    proto = onnx.load(str(path))
    target = next(t for t in proto.graph.initializer if t.name.endswith("layers.0.mlp.down_proj.weight.T"))
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(1.05), target.name))
    broken = path.parent.parent / "broken-decoder.onnx"
    onnx.save_model(proto, str(broken))  # inline: the tiny decoder fits
    model, ckpt = load_model(tiny, tiny / "clip", device="meta")
    spec = next(s for s in graph_specs(model, m.contract) if s.name == "decoder")
    checks, _ = check_graph(spec, broken, model, ckpt.weights, REFERENCE)
    assert not all(c.passed for c in checks)
    assert max(c.rel_l2 for c in checks if c.output == "logits") > 1e-3


def test_streamed_int4w_is_onnxruntimes_quantisation(reads, tiny, tmp_path):
    from tgedge.calibration.quantize import quantize_export

    result, _ = reads
    direct = export_model(tiny, tmp_path / "direct", clip=tiny / "clip", decoder_weights="int4w", check=False)
    quantized = quantize_export(result.directory, tmp_path / "quantized", "int4w")
    assert direct.manifest.graphs["decoder"].precision == quantized.manifest.graphs["decoder"].precision == "int4w"

    def blocks(directory):
        proto = onnx.load(str(directory / "decoder.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        return [(inits[n.input[1]], inits[n.input[2]]) for n in proto.graph.node if n.op_type == "MatMulNBits"]

    a, b = blocks(direct.directory), blocks(quantized.directory)
    assert len(a) == len(b) > 0
    for (qa, sa), (qb, sb) in zip(a, b):
        np.testing.assert_array_equal(qa, qb)
        np.testing.assert_array_equal(sa, sb)
    assert json.loads((tmp_path / "direct" / "manifest.json").read_text())["graphs"]["decoder"]["precision"] == "int4w"


def test_a_decoder_too_big_to_check_whole_is_checked_by_its_first_layers(tiny, tmp_path, monkeypatch):
    """Where torch and onnxruntime cannot both hold the decoder (a 7 B one here), its first layers are written by the
    same builder from the same weights and checked instead; the result says so."""
    from tgedge.checkpoint import load_model
    from tgedge.export import onnx_export

    _, ckpt = load_model(tiny, tiny / "clip", device="meta")
    whole = onnx_export._check_bytes(ckpt.weights, ("language_model.", "lm_head."))
    monkeypatch.setattr(onnx_export, "_available_bytes", lambda: int(whole) - 1)
    result = export_model(tiny, tmp_path / "e", clip=tiny / "clip")
    decoder = [c for c in result.checks if c.graph == "decoder"]
    assert result.passed and decoder and not any(c.skipped for c in decoder)
    assert all(c.scope.startswith("first ") and "layers" in c.scope for c in decoder)
    assert max(c.rel_l2 for c in decoder) < 1e-4
    assert not list((tmp_path / "e").glob(".decoder-check*"))


def test_the_triton_repository_gives_the_tied_decoder_its_shared_table(reads, tmp_path):
    """Each stage's model directory holds every weights file its graph names (the tied decoder: the embed graph's
    table too), so onnxruntime (tritonserver's onnxruntime backend) opens the graph from there alone."""
    import onnxruntime as ort

    from tgedge.serving.repository import RepositorySettings, write_repository

    result, _ = reads
    write_repository(result.directory, tmp_path / "repo", RepositorySettings("onnxruntime"))
    version = tmp_path / "repo" / "decoder" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["decoder.onnx.data", "embed.onnx.data", "model.onnx"]
    ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
