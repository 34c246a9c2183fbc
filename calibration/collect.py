"""Multimodal calibration data: the real inputs of every graph, recorded from the fp32 runtime.

Each sample of a data folder (image + prompt) goes through the fp32 `Pipeline` and its greedy answer is
generated, so every graph sees what it sees in deployment: the text guide on the question, the vision
tower on the main view and its 4 crops, fusion on both, and the decoder on the prefill and on each decode
step with its KV cache. Min/max ranges are folded as the samples run (`collect_ranges`, nothing kept); the
histogram methods get the recorded feeds (`collect`), which drive onnxruntime's `CalibrationDataReader`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tgedge.errors import TgedgeError
from tgedge.precision import REFERENCE
from tgedge.runtime.backends import make_runner
from tgedge.runtime.runner import BaseRunner


class RecordingRunner(BaseRunner):
    """A runner around another one that keeps a host copy of every feed it is given."""

    def __init__(self, runner: BaseRunner, feeds: list[dict[str, np.ndarray]]):
        super().__init__(runner.name)
        self.runner, self.feeds = runner, feeds

    def activate_impl(self) -> None:
        self.runner.activate()

    def deactivate_impl(self) -> None:
        self.runner.deactivate()

    def get_input_metadata_impl(self):
        return self.runner.get_input_metadata()

    def get_output_metadata_impl(self):
        return self.runner.get_output_metadata()

    def describe_value(self, value: Any):
        return self.runner.describe_value(value)

    def infer_impl(self, feed: dict[str, Any], **kwargs) -> dict[str, Any]:
        self.feeds.append({k: np.array(v if isinstance(v, np.ndarray) else v.numpy()) for k, v in feed.items()})
        return self.runner.infer(feed, check_inputs=False, **kwargs)


class FeedReader:
    """onnxruntime.quantization.CalibrationDataReader over recorded feeds (duck-typed: get_next / rewind)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds, self.i, self.end = feeds, 0, len(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= self.end:
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0

    def set_range(self, start_index: int, end_index: int) -> None:
        """onnxruntime's strided calibration: one sample at a time, because the feeds' shapes differ."""
        self.i, self.end = start_index, min(end_index, len(self.feeds))

    def __len__(self) -> int:
        return len(self.feeds)


def _answer_all(export_dir: str | Path, data: str | Path, limit: int | None, max_new_tokens: int, progress,
                runner_factory, verify: str | None = "fingerprint") -> None:
    """The fp32 export answers every sample of `data` through the runners `runner_factory` makes (`verify`: the
    Pipeline's check of the graphs; None where the caller checked them, or was told not to)."""
    from tgedge.data.folder import read_folder
    from tgedge.runtime.pipeline import Pipeline

    records = read_folder(data)[:limit]
    with Pipeline(export_dir, runner_factory=runner_factory, verify=verify) as pipe:
        bad = {g: e.precision for g, e in pipe.manifest.graphs.items() if e.precision != REFERENCE.name}
        if bad:
            raise TgedgeError(f"{export_dir}: calibrate on the fp32 export (these graphs are not fp32: {bad})")
        options = pipe.options(max_new_tokens=max_new_tokens)
        for r in records:
            with r.errors():
                pipe.answer(r.image, r.prompt, options)
            if progress is not None:
                progress()


def collect_ranges(export_dir: str | Path, data: str | Path, graphs: list[str], op_types: tuple[str, ...],
                   limit: int | None = None, max_new_tokens: int = 4, progress=None,
                   channel_absmax: dict | None = None, channel_mean_sq: dict | None = None,
                   verify: str | None = "fingerprint") -> dict[str, Any]:
    """graph name -> onnxruntime `TensorsData`: the symmetric min/max ranges of `graphs`' calibrated tensors while
    the fp32 export answered every sample of `data`, folded call by call (`tgedge.calibration.ranges`); memory is
    the graphs once, whatever the number of samples. `channel_absmax`, when given, is filled with graph -> tensor ->
    max |x| per channel of the inputs SmoothQuant can smooth, measured in the same pass; `channel_mean_sq` with the
    mean of x^2 per channel of the same inputs (AWQ-style scales)."""
    from tgedge.calibration.ranges import MinMaxRunner

    runners: dict[str, MinMaxRunner] = {}

    def measuring(manifest, graph: str) -> BaseRunner:
        if graph not in graphs:
            return make_runner("onnxruntime", manifest, graph)
        runners[graph] = MinMaxRunner(manifest, graph, op_types,
                                      per_channel=channel_absmax is not None or channel_mean_sq is not None)
        return runners[graph]

    _answer_all(export_dir, data, limit, max_new_tokens, progress, measuring, verify)
    if channel_absmax is not None:
        channel_absmax.update({g: r.channel_absmax for g, r in runners.items()})
    if channel_mean_sq is not None:
        channel_mean_sq.update({g: {t: r.channel_sumsq[t] / r.channel_rows[t] for t in r.channel_sumsq}
                                for g, r in runners.items()})
    return {g: r.tensors_data() for g, r in runners.items()}


def collect(export_dir: str | Path, data: str | Path, limit: int | None = None, max_new_tokens: int = 4,
            progress=None, verify: str | None = "fingerprint") -> dict[str, list[dict[str, np.ndarray]]]:
    """graph name -> the feeds it received while the fp32 export answered every sample of `data` (what the
    histogram calibrators need; min/max streams instead: `collect_ranges`)."""
    feeds: dict[str, list] = {}

    def recording(manifest, graph: str) -> RecordingRunner:
        return RecordingRunner(make_runner("onnxruntime", manifest, graph), feeds.setdefault(graph, []))

    _answer_all(export_dir, data, limit, max_new_tokens, progress, recording, verify)
    # The vision stage sees the main view and its crops in one batch; the calibrator runs every feed through a graph
    # that outputs every activation, so one view at a time bounds its memory (a ViT-L/336 batch of 5 views is ~10 GiB
    # of activations). Min/max (and histogram) ranges over single views are the ranges over the batch.
    feeds["vision"] = [{"pixel_values": f["pixel_values"][i:i + 1]} for f in feeds.get("vision", [])
                       for i in range(f["pixel_values"].shape[0])]
    return feeds
