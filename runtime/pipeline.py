"""`Pipeline(export_dir, backend)`: preprocess -> text_guide -> vision -> fusion -> prefill -> decode, torch-free.

The stages mirror `tgedge.model.TGLlava`'s methods (numpy in, numpy out), and the answer flow, sampling and
streaming are the reference's own (`tgedge.generate`), so that `tgedge validate` compares like with like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tgedge.errors import TgedgeError
from tgedge.generate import AnswerMixin
from tgedge.preprocess import Inputs, Preprocessor, split_views, stack_views
from tgedge.runtime.manifest import Manifest, io_differences
from tgedge.runtime.runner import BaseRunner

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt")
_ORT_DEVICES = {"onnxruntime": "cpu", "onnxruntime-cuda": "cuda", "onnxruntime-trt": "trt"}


def make_runner(backend: str, manifest: Manifest, graph: str) -> BaseRunner:
    if backend in _ORT_DEVICES:
        from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx

        return OnnxRuntimeRunner(SessionFromOnnx(manifest.graph_path(graph), _ORT_DEVICES[backend]), graph)
    if backend == "tensorrt":
        from tgedge.runtime.tensorrt import TensorRTRunner

        return TensorRTRunner(manifest, graph)
    raise TgedgeError(f"unknown backend {backend!r} (choose from torch, {', '.join(BACKENDS)})")


def check_against_manifest(runner: BaseRunner, manifest: Manifest, graph: str) -> None:
    """The graph file's own inputs/outputs must be the ones the manifest lists (names, dtypes, ranks)."""
    entry = manifest.graphs[graph]
    for kind, listed, actual in (("inputs", entry.inputs, runner.get_input_metadata()),
                                 ("outputs", entry.outputs, runner.get_output_metadata())):
        diff = io_differences(listed, list(actual.values()), full_shape=False)
        if diff:
            raise TgedgeError(f"{manifest.graph_path(graph)}: graph {kind} do not match manifest.json "
                              f"(differing: {', '.join(diff)})")


class Pipeline(AnswerMixin):
    def __init__(self, export_dir: str | Path, backend: str = "onnxruntime", context: int | None = None):
        self.manifest = Manifest.load(export_dir)
        self.pre = Preprocessor.from_dir(export_dir)
        self.backend = backend
        self.context = min(context or self.manifest.max_context, self.manifest.max_context)
        self.runners: dict[str, BaseRunner] = {}
        try:
            for graph in self.manifest.graphs:
                runner = make_runner(backend, self.manifest, graph)
                runner.activate()
                self.runners[graph] = runner
                check_against_manifest(runner, self.manifest, graph)
        except BaseException:
            self.close()
            raise
        past = [t for t in self.manifest.graphs["decoder"].inputs if t.name.startswith("past_key_values.")]
        self._past_meta = past
        self._present = tuple(t.name for t in self.manifest.graphs["decoder"].outputs if t.name.startswith("present."))
        self._cache: dict | None = None
        self._cache_len = 0

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- stages ---------------------------------------------------------------------------------------------
    def text_guide(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.runners["text_guide"].infer({"input_ids": ids})
        return out["text_features"], out["text_pooled"]

    def vision(self, views: np.ndarray) -> np.ndarray:
        return self.runners["vision"].infer({"pixel_values": views})["image_features"]

    def fuse(self, features: np.ndarray, crop_features=None, text_tokens=None, text_pooled=None) -> np.ndarray:
        given = {"image_features": features, "crop_features": crop_features, "text_features": text_tokens,
                 "text_pooled": text_pooled}
        names = [t.name for t in self.manifest.graphs["fusion"].inputs]
        return self.runners["fusion"].infer({n: given[n] for n in names})["image_embeds"]

    def embed(self, ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Token ids (1, T) -> embeddings (1, T, D), image embeddings placed at the image-token positions."""
        is_image = ids == self.pre.spec.image_token_id
        x = self.runners["embed"].infer({"input_ids": np.where(is_image, 0, ids)})["inputs_embeds"]
        n = int(is_image.sum())
        if n:
            if image_embeds is None or image_embeds.shape[0] * image_embeds.shape[1] != n:
                got = "none" if image_embeds is None else tuple(image_embeds.shape)
                raise TgedgeError(f"{n} image-token positions but image embeddings {got}")
            x[is_image] = image_embeds.reshape(n, -1)
        return x

    def encode_image(self, pixel_values: np.ndarray, crops: np.ndarray | None = None,
                     guide_ids: np.ndarray | None = None) -> np.ndarray:
        main, crop_feats = split_views(self.vision(stack_views(pixel_values, crops)), pixel_values.shape[0])
        tokens = pooled = None
        if self.manifest.has_text_guide:
            tokens, pooled = self.text_guide(guide_ids)
        return self.fuse(main, crop_feats, tokens, pooled)

    def embeddings(self, inputs: Inputs) -> np.ndarray:
        image = self.encode_image(inputs.pixel_values, inputs.crops, inputs.guide_ids)
        return self.embed(inputs.input_ids, image)

    def decoder(self, x: np.ndarray, past: dict, past_len: int, keep: tuple[str, ...] = ()) -> dict:
        """One decoder call: embeddings (1, T, D) after `past_len` cached positions -> logits + present."""
        t = x.shape[1]
        feed = {"inputs_embeds": x, "attention_mask": np.ones((1, past_len + t), np.int64),
                "position_ids": np.arange(past_len, past_len + t, dtype=np.int64)[None], **past}
        return self.runners["decoder"].infer(feed, keep=keep)

    def empty_past(self) -> dict[str, np.ndarray]:
        return {t.name: np.zeros((1, t.shape[1], 0, t.shape[3]), np.dtype(t.dtype)) for t in self._past_meta}

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Full-sequence logits (1, T, V) from an empty cache (teacher forcing in `tgedge validate`)."""
        return self.decoder(x, self.empty_past(), 0)["logits"]

    # -- decode steps (tgedge.generate drives them) -----------------------------------------------------------
    def setup_cache(self, max_len: int) -> None:
        if max_len > self.manifest.max_context:
            raise TgedgeError(f"{max_len} positions exceed the export's max context ({self.manifest.max_context})")
        self._cache, self._cache_len = self.empty_past(), 0

    def clear_cache(self) -> None:
        self._cache, self._cache_len = None, 0

    def _step(self, x: np.ndarray) -> np.ndarray:
        # present.* stay where the backend put them (the GPU on CUDA) and come back as the next past.
        out = self.decoder(x, self._cache, self._cache_len, keep=self._present)
        self._cache = {p.name: out[p.name.replace("past_key_values.", "present.")] for p in self._past_meta}
        self._cache_len += x.shape[1]
        return out["logits"][0, -1]

    def prefill(self, x: np.ndarray) -> np.ndarray:
        return self._step(x)

    def decode_one_token(self, token: int, pos: int) -> np.ndarray:
        if pos != self._cache_len:
            raise TgedgeError(f"decode at position {pos} but the cache holds {self._cache_len}")
        return self._step(self.runners["embed"].infer({"input_ids": np.array([[token]], np.int64)})["inputs_embeds"])
