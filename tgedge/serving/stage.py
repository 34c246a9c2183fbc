"""One stage's graph as a Triton Python-backend model (`tgedge triton --backend python`), run by tgedge's ONNX
Runtime runner. Imported by the model.py `tgedge triton` writes, inside the server only.

With dynamic batching, Triton hands `execute` several requests at once and the Python backend leaves batching to
the model: requests whose tensors agree past the first (batch or views) dim are concatenated along it, run once,
and the outputs split back by each request's share.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from tgedge.errors import TgedgeError, one_line
from tgedge.runtime.backends import GraphFile, make_runner


def parameters(config: dict) -> dict[str, str]:
    """A model config's `parameters` as plain strings."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def error_response(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


def batches(feeds: list[tuple[int, dict[str, np.ndarray]]]) -> list[list[tuple[int, dict[str, np.ndarray]]]]:
    """Requests grouped so that each group's tensors can be concatenated along dim 0 (same dtypes, same other
    dims); groups keep arrival order."""
    groups: dict[tuple, list] = {}
    for index, feed in feeds:
        key = tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(feed.items()))
        groups.setdefault(key, []).append((index, feed))
    return list(groups.values())


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = parameters(config)
        self.stage = params.get("stage") or args["model_name"]
        graph = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        threads = int(params.get("threads") or 0)
        self.vocab = int(params.get("vocab_size") or 0)  # input_ids index it: onnxruntime's Gather would fail with a
        # stack trace above it, and take a negative id from the end of the table
        self.runner = make_runner("onnxruntime", GraphFile(graph), self.stage, threads=threads)
        self.runner.activate()
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]

    def execute(self, requests):
        responses = [None] * len(requests)
        feeds = []
        for i, request in enumerate(requests):
            feed = {n: pb_utils.get_input_tensor_by_name(request, n) for n in self.inputs}
            missing = [n for n, t in feed.items() if t is None]
            if missing:
                responses[i] = error_response(f"{self.stage}: missing input(s) {', '.join(missing)}")
                continue
            arrays = {n: t.as_numpy() for n, t in feed.items()}
            problem = self._id_problem(arrays.get("input_ids"))
            if problem:
                responses[i] = error_response(problem)
                continue
            feeds.append((i, arrays))
        for group in batches(feeds):
            try:
                outputs = self._run(group)
            except Exception as e:  # noqa: BLE001 - one line to the client, never the backend's stack frames
                message = str(e) if isinstance(e, TgedgeError) else f"{self.stage}: {type(e).__name__}: {e}"
                outputs = [error_response(one_line(message))] * len(group)
            for (i, _), response in zip(group, outputs):
                responses[i] = response
        return responses

    def _id_problem(self, ids) -> str | None:
        if ids is None or not self.vocab or ids.size == 0:
            return None
        low, high = int(ids.min()), int(ids.max())
        if low >= 0 and high < self.vocab:
            return None
        return (f"{self.stage}: input 'input_ids' must hold token ids in [0, {self.vocab - 1}] (the vocabulary; got "
                f"{low if low < 0 else high})")

    def _run(self, group) -> list:
        """One runner call for the group; each request's rows of every output."""
        sizes = [next(iter(feed.values())).shape[0] for _, feed in group]
        feed = group[0][1] if len(group) == 1 else {
            n: np.concatenate([f[n] for _, f in group]) for n in self.inputs}
        out = self.runner.infer(feed)
        ends = np.cumsum(sizes)
        return [pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(out[n][end - size:end]))
                                            for n in self.outputs]) for size, end in zip(sizes, ends)]

    def finalize(self):
        self.runner.deactivate()
