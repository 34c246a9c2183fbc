"""The weights of a traced graph, written by tgedge instead of by the exporter: bounded memory for the vision tower.

`torch.onnx.export` with its parameters holds the module's weights, the constant-folded copies (every Linear weight
transposed for its MatMul) and the serialised model at once: a ViT-L/336 vision graph (1.16 GB of fp32 weights) took
the export from 2.0 to 5.0 GiB. Traced with `export_params=False, do_constant_folding=False` instead, the exporter
writes only the structure; the weights are the module's own tensors (already in memory), and this module

1. folds what the exporter would have folded: every node whose inputs are all weights or constants (a Linear's
   `Transpose(weight)`, `Unsqueeze` of a constant) becomes an initializer, and Constant nodes nothing else reads go;
2. declares each initializer with its shape and type and no data, so that the fp16 conversion retypes it without
   converting anything;
3. writes each initializer's data once, in its final type, straight to the external data file (or inline), one tensor
   at a time: a fold is a numpy view (a transpose) until its bytes are written.

Peak memory: the module's weights plus one tensor. The graph is the exporter's folded one node for node (tested).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from tgedge.errors import TgedgeInternalError

Value = Callable[[], np.ndarray]
INLINE_BYTES = 1024  # smaller tensors stay in the .onnx file when the rest go to external data (onnx's default)


def module_values(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by the names the exporter gives their graph inputs (aliases included)."""
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    return {name: t.detach() for name, t in named}


def _constant(node: onnx.NodeProto) -> np.ndarray:
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    dtype = np.float32 if attr.name.startswith("value_float") else np.int64 if attr.name.startswith("value_int") \
        else None
    return np.asarray(helper.get_attribute_value(attr), dtype)


def _evaluate(node: onnx.NodeProto, inputs: list[np.ndarray]) -> np.ndarray:
    """One node on constant inputs: the shape ops by numpy (views: no copy), anything else by onnx's reference."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Transpose":
        return np.transpose(inputs[0], attrs.get("perm"))
    if node.op_type == "Unsqueeze" and len(inputs) == 2:
        return np.expand_dims(inputs[0], tuple(int(a) for a in inputs[1]))
    if node.op_type == "Identity":
        return inputs[0]
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" for i in range(len(inputs))]
    single = helper.make_node(node.op_type, names, ["out"], domain=node.domain, **attrs)
    graph = helper.make_graph([single], "fold", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(
        v.dtype), v.shape) for n, v in zip(names, inputs)], [helper.make_empty_tensor_value_info("out")])
    return ReferenceEvaluator(graph).run(None, dict(zip(names, inputs)))[0]


def fold_weights(proto: onnx.ModelProto, weights: dict[str, torch.Tensor]) -> dict[str, Value]:
    """Turn the weight inputs of a structure-only trace into initializers (declared, no data), folding every node
    that computes from weights and constants alone. -> each initializer's value (and those its folds read),
    computed when asked; clear it once `place_weights` has run (its folds refer to it)."""
    graph = proto.graph
    inputs = {i.name for i in graph.input}
    values: dict[str, Value] = {n: (lambda t=t: t.numpy()) for n, t in weights.items() if n in inputs}
    from_weights = set(values)  # folds of a weight become initializers; folds of constants alone, Constant nodes
    constant_nodes = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant":
            constant_nodes[node.output[0]] = node
            values[node.output[0]] = (lambda n=node: _constant(n))
            kept.append(node)
        elif len(node.output) == 1 and node.input and all(i in values for i in node.input if i):
            args = [i for i in node.input if i]
            out = node.output[0]
            values[out] = (lambda n=node, a=args: _evaluate(n, [values[x]() for x in a]))
            if from_weights.intersection(args):
                from_weights.add(out)
            else:  # as the exporter folds them: a Constant node where the computation was
                constant = helper.make_node("Constant", [], [out], name=f"{node.name}/folded",
                                            value=numpy_helper.from_array(np.asarray(values[out]())))
                constant_nodes[out] = constant
                kept.append(constant)
        else:
            kept.append(node)
    read = {i for n in kept if n.op_type != "Constant" for i in n.input} | {o.name for o in graph.output}
    kept = [n for n in kept if n.op_type != "Constant" or n.output[0] in read]
    needed = [n for n in values if n in read and n not in constant_nodes]  # weights and folds the graph reads
    del graph.node[:]
    graph.node.extend(kept)
    stay = [i for i in graph.input if i.name not in values]
    del graph.input[:]
    graph.input.extend(stay)
    for name in needed:
        v = values[name]()
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(v.dtype), dims=list(v.shape))
        t.data_location = TensorProto.EXTERNAL  # declared: its data is written by place_weights
        graph.initializer.append(t)
    return values  # the folds read their inputs from it: the caller clears it when the weights are written


def place_weights(proto: onnx.ModelProto, values: dict[str, Value], directory: Path, data_file: str | None) -> None:
    """Write each declared initializer's data in the type the graph now gives it (fp16 where the conversion retyped
    it): to `data_file` (64-byte aligned; tensors under 1 KiB inline) or inline when `data_file` is None."""
    from onnxruntime.transformers import float16

    from tgedge.export.decoder_graph import WeightStore

    store = WeightStore(directory, data_file)
    try:
        for t in proto.graph.initializer:
            if t.data_location != TensorProto.EXTERNAL or t.external_data:
                continue  # data of its own (a constant the conversion added)
            if t.name not in values:
                raise TgedgeInternalError(f"initializer {t.name} has no value to write")
            v = values[t.name]()
            if t.data_type == TensorProto.FLOAT16 and v.dtype == np.float32:  # retyped: as the converter converts
                v = float16.convert_np_to_float16(v)
            v = v.astype(helper.tensor_dtype_to_np_dtype(t.data_type), copy=False)
            if tuple(v.shape) != tuple(t.dims):
                raise TgedgeInternalError(f"initializer {t.name}: value {v.shape} for dims {tuple(t.dims)}")
            data = np.ascontiguousarray(v)  # a fold's one copy (a transpose); a weight's own memory otherwise
            t.data_location = TensorProto.DEFAULT
            if data_file is None or data.nbytes < INLINE_BYTES:
                t.raw_data = data.tobytes()
            else:
                store.place(t, memoryview(data.reshape(-1)).cast("B"))
            del data
    finally:
        store.close()
