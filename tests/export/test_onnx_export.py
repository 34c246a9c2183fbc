"""ONNX export: one graph per registered spec, checked against torch, byte-identical, self-contained."""

import json

import numpy as np
import onnx
import pytest

from tgedge.cli import main
from tgedge.errors import TgedgeError
from tgedge.export.onnx_export import export_model, newest_opset
from tgedge.export.specs import SPECS
from tgedge.runtime.manifest import GRAPHS, Manifest

TESTED_SPECS = ["text_guide", "vision", "fusion", "embed", "decoder"]


def test_every_registered_spec_has_a_test():
    assert set(SPECS) == set(TESTED_SPECS) == set(GRAPHS)


@pytest.mark.parametrize("name", TESTED_SPECS)
def test_graph_matches_its_spec_and_torch(demo_export, name):
    m = demo_export.manifest
    entry = m.graphs[name]
    proto = onnx.load(str(m.graph_path(name)))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == [t.name for t in entry.inputs]
    assert [o.name for o in proto.graph.output] == [t.name for t in entry.outputs]
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}  # standard ops only
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    checks = [c for c in demo_export.checks if c.graph == name]
    assert len({tuple(c.dims.items()) for c in checks}) == 2  # checked at two shapes
    assert all(c.passed for c in checks), [c.to_dict() for c in checks if not c.passed]
    for t in entry.inputs + entry.outputs:  # symbolic dims stay symbolic in the file
        assert any(isinstance(d, str) for d in t.shape)


def test_decoder_io_names_follow_optimum(demo_export):
    dec = demo_export.manifest.graphs["decoder"]
    layers = demo_export.manifest.contract.cache.num_layers
    assert [t.name for t in dec.inputs[:3]] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert [t.name for t in dec.inputs[3:]] == [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert [t.name for t in dec.outputs] == ["logits"] + [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    assert dec.inputs[3].shape[2] == "past_sequence_length" and dec.outputs[1].shape[2] == "total_sequence_length"


def test_manifest_makes_the_directory_self_contained(demo_export):
    d = demo_export.directory
    raw = json.loads((d / "manifest.json").read_text())
    assert raw["opset"] == 17 and raw["tgedge_version"]
    assert set(raw["files"].values()) == {"preprocess.json", "tokenizer.json", "guide_tokenizer.json"}
    assert len(raw["source"]["sha256"]) == 64
    for name in raw["graphs"]:
        assert raw["reference"][name]["outputs"], name  # reference checksums on the fixed input
    dims = raw["dims"]
    assert dims["past_sequence_length"]["min"] == 0
    assert dims["sequence_length"]["max"] == raw["max_context"]
    assert Manifest.load(d).graphs.keys() == raw["graphs"].keys()
    # the stage contract, genai_config style: the cache names, mode and TensorRT profiles in their order
    assert raw["fusion_family"] == "tg" and raw["stages"] == list(raw["graphs"])
    kv = raw["kv_cache"]
    assert kv["mode"] == "growing" and not kv["past_present_share_buffer"]
    assert kv["past_key_names"] == "past_key_values.%d.key" and kv["present_value_names"] == "present.%d.value"
    assert [p["name"] for p in kv["profiles"]] == ["prefill", "decode"]
    assert kv["profiles"][1]["dims"]["sequence_length"] == [1, 1, 1]


def test_same_checkpoint_gives_byte_identical_files(demo_export, tmp_path):
    again = export_model("demo", tmp_path / "again").directory
    first = sorted(p.name for p in demo_export.directory.iterdir())
    assert sorted(p.name for p in again.iterdir()) == first
    for name in first:
        assert (again / name).read_bytes() == (demo_export.directory / name).read_bytes(), name


def test_external_data_and_plain_llava(tmp_path):
    """A plain LLaVA (no TG) exports without text_guide; weights can live beside the graphs."""
    from tiny import hf_llava

    from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx

    hf_llava(tmp_path / "ckpt")
    result = export_model(tmp_path / "ckpt", tmp_path / "out", external_data=True)
    m = result.manifest
    assert result.passed and "text_guide" not in m.graphs
    assert [t.name for t in m.graphs["fusion"].inputs] == ["image_features"]
    for g in m.graphs.values():
        assert g.external_data == f"{g.file}.data" and (result.directory / g.external_data).exists()
    with OnnxRuntimeRunner(SessionFromOnnx(m.graph_path("embed"))) as r:
        assert r.infer({"input_ids": np.array([[1, 2]])})["inputs_embeds"].shape[:2] == (1, 2)


def test_bad_options_are_errors_and_write_nothing(tmp_path):
    import torch.onnx._constants

    assert newest_opset() <= torch.onnx._constants.ONNX_MAX_OPSET  # torch's exporter fails above it
    with pytest.raises(TgedgeError, match="opset 11 is too old"):
        export_model("demo", tmp_path / "a", opset=11)
    with pytest.raises(TgedgeError, match=f"opset {newest_opset() + 1} is newer than the installed exporter writes"):
        export_model("demo", tmp_path / "a", opset=newest_opset() + 1)
    with pytest.raises(TgedgeError, match="--max-context must be in"):
        export_model("demo", tmp_path / "b", max_context=10)
    with pytest.raises(TgedgeError, match="checkpoint directory not found"):
        export_model(tmp_path / "missing", tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_export_cli(tmp_path, capsys):
    assert main(["export", "demo", "-o", str(tmp_path / "e"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] and set(out["graphs"]) == set(GRAPHS)


def _canonical(proto: onnx.ModelProto, directory) -> list[tuple]:
    """A graph as (op, inputs, outputs, attributes) per node, with weights and constants named by their content and
    intermediate tensors by their producer's position: two exports are the same graph when these are equal."""
    import hashlib

    from onnx import numpy_helper

    def key(t):
        v = numpy_helper.to_array(t, str(directory))
        return v.dtype.str, v.shape, hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest()

    names = {t.name: key(t) for t in proto.graph.initializer}
    outputs = {o.name for o in proto.graph.output}
    nodes = []
    for i, n in enumerate(proto.graph.node):
        for j, o in enumerate(n.output):
            if o not in outputs:
                names[o] = ("constant", *key(n.attribute[0].t)) if n.op_type == "Constant" else f"t{i}.{j}"
        attrs = () if n.op_type == "Constant" else tuple(str(a) for a in n.attribute)
        nodes.append((n.op_type, tuple(names.get(x, x) for x in n.input), tuple(names.get(x, x) for x in n.output),
                      attrs))
    return nodes


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_traced_graphs_are_the_exporters_folded_graphs(dtype, tmp_path):
    """The traced graphs' weights are folded and written by tgedge (export/traced_weights.py, bounded memory), not by
    torch.onnx: the result is the graph torch.onnx writes with its parameters and constant folding, node for node,
    every weight byte for byte (fp16: converted by the same conversion)."""
    import warnings

    import torch

    from tgedge import demo_checkpoint
    from tgedge.checkpoint import load_model, materialize
    from tgedge.export.specs import graph_specs

    ours = export_model("demo", tmp_path / "ours", dtype=dtype, check=False)
    model, ckpt = load_model(demo_checkpoint(), device="meta")
    for spec in graph_specs(model, ours.manifest.contract):
        if spec.written:
            continue
        materialize(model, ckpt.weights, spec.prefixes)
        args = tuple(spec.make_inputs(spec.check_shapes[1], torch.Generator().manual_seed(0)).values())
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(spec.module.eval(), args, str(tmp_path / "torch.onnx"), dynamo=False, opset_version=17,
                              input_names=[t.name for t in spec.inputs],
                              output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes,
                              do_constant_folding=True)
        theirs = onnx.load(str(tmp_path / "torch.onnx"))
        if dtype == "fp16":
            from tgedge.calibration.convert import to_fp16

            theirs, _ = to_fp16(theirs, [])
        mine = onnx.load(str(ours.directory / f"{spec.name}.onnx"))
        assert _canonical(mine, ours.directory) == _canonical(theirs, tmp_path), spec.name
        assert len(mine.graph.initializer) == len(theirs.graph.initializer)
