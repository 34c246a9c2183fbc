"""CUDA-graph decode on onnxruntime's CUDA provider (`OnnxRuntimeRunner` with `cuda_graph=True`).

A decode step (one new position) on a static KV cache has the same shapes and device addresses every step once every
input and output is a fixed device buffer: the cache (StaticCache's buffers, past and present in one), the step's
embeddings (1, 1, D), the attention mask at its full (1, max_context) with zeros past the filled positions
(GroupQueryAttention takes the length from the mask's sum, so the `static` graph decodes alike: a CI test), and the
logits (1, 1, V). onnxruntime then captures the step once (session provider option `enable_cuda_graph`, run option
`gpu_graph_id`) and replays it for every token; the step's inputs are written into their buffers in place
(`OrtValue.update_inplace`), and nothing is allocated or bound per step. Every other call of that session (prefill)
runs uncaptured (`gpu_graph_id` -1). The `static-onnx` graph takes positions from the mask's length, so it cannot
decode from a fixed-size mask: its runner refuses the option.

Not yet run on a GPU (no GPU was lent to the session that wrote it): tested against a fake onnxruntime
(tests/runtime/test_cudagraph.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

DECODE_GRAPH = "1"  # gpu_graph_id of the decode step's graph
NO_GRAPH = "-1"  # gpu_graph_id that runs a call uncaptured


def run_options(ort, graph_id: str):
    options = ort.RunOptions()
    options.add_run_config_entry("gpu_graph_id", graph_id)
    return options


class GraphStep:
    """The decode step's own binding: the cache's buffers (bound as in `Bound`) and fixed device buffers for the
    embeddings, the mask and the logits, all bound once; `run` writes the step's inputs in place and replays."""

    def __init__(self, runner, bound, embeds_dtype: str, logits_name: str, logits_shape: tuple[int, ...],
                 logits_dtype: str, ort):
        first = next(iter(bound.inputs.values()))
        self.max_length = runner.describe_value(first)[1][2]  # (B, Hkv, M, D)
        hidden = int(runner.get_input_metadata()["inputs_embeds"].shape[-1])
        self.bound, self.logits_name = bound, logits_name
        self.embeds = runner.buffer((1, 1, hidden), embeds_dtype)
        self.mask = runner.buffer((1, self.max_length), "int64")
        self.logits = runner.buffer(logits_shape, logits_dtype)
        self._mask_host = np.zeros((1, self.max_length), np.int64)
        self._embeds_dtype = np.dtype(embeds_dtype)
        self.io = runner.session.io_binding()
        for name, value in bound.inputs.items():
            self.io.bind_ortvalue_input(name, value)
        for name, value in bound.output_buffers().items():
            self.io.bind_ortvalue_output(name, value)
        self.io.bind_ortvalue_input("inputs_embeds", self.embeds)
        self.io.bind_ortvalue_input("attention_mask", self.mask)
        self.io.bind_ortvalue_output(logits_name, self.logits)
        self.options = run_options(ort, DECODE_GRAPH)
        self.steps = 0

    def run(self, session, embeds: np.ndarray, filled: int) -> Any:
        """One decode step: `filled` positions valid after it (the cached ones and the new one); -> the logits
        buffer (on the device)."""
        if filled > self.max_length:
            from tgedge.errors import TgedgeError

            raise TgedgeError(f"{filled} positions exceed the static cache ({self.max_length})")
        self._mask_host[0, :filled] = 1
        self._mask_host[0, filled:] = 0  # a new sequence after a longer one
        self.mask.update_inplace(self._mask_host)
        self.embeds.update_inplace(np.ascontiguousarray(embeds, self._embeds_dtype))
        session.run_with_iobinding(self.io, self.options)
        self.steps += 1
        return self.logits
