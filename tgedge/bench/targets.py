"""What is benched: a target (a model on a backend, or a peer) opens a pipeline and says what the floors need."""

from __future__ import annotations

from dataclasses import dataclass, field

from tgedge.precision import float_name



@dataclass
class Target:
    """A model on a backend: `open()` gives a pipeline (tgedge's runtime or its torch reference)."""
    name: str
    model: str
    backend: str
    clip: str | None = None
    kind: str = "tgedge"  # or torch (the reference), genai (onnxruntime-genai), transformers (its LLaVA generate)
    info: dict = field(default_factory=dict)  # precision, cache mode, weight bytes, KV bytes per position, config
    threads: int = 0  # intra-op threads (0: the library's default): onnxruntime's, or torch's (process-wide)
    spin: bool = True  # onnxruntime's idle threads spin
    cuda_graph: bool = False  # onnxruntime-cuda: decode steps replayed as CUDA graphs (runtime.cudagraph)
    device: str = "cpu"  # torch and transformers: where torch runs them (cuda: in fp16; tgedge.reference.torch_device)

    def open(self, text_only: bool = False):
        """`text_only`: an export's embed and decoder graphs alone (text-only prompts need no more)."""
        from tgedge.pipelines import open_pipeline

        if self.kind == "genai":
            from tgedge.bench.peers import GenaiPeer

            return GenaiPeer(self.model, self.clip, self.threads)  # clip: the worker's python
        if self.kind in ("torch", "transformers") and self.threads:
            import torch

            torch.set_num_threads(self.threads)  # process-wide: torch has no per-model setting
        if self.kind == "transformers":
            from tgedge.bench.peers import TransformersPeer

            return TransformersPeer(self.model, self.clip, self.device)
        if self.kind == "tgedge":
            stages = ("embed", "decoder") if text_only else None
            graphs = {"cuda_graph": True} if self.cuda_graph else {}
            return open_pipeline(self.model, self.backend, self.clip, stages=stages, threads=self.threads,
                                 spin=self.spin, **graphs)
        return open_pipeline(self.model, self.backend, self.clip, torch_device=self.device)


def describe_target(target: Target, pipe) -> dict:
    """What the floors need: the decoder's weight bytes and KV bytes per position, the model config."""
    from tgedge.floors import graph_weight_bytes, kv_bytes_per_position

    if hasattr(pipe, "bench_run"):  # a peer (onnxruntime-genai, transformers) describes itself
        return pipe.describe()
    manifest = getattr(pipe, "manifest", None)
    if manifest is not None:
        cache = manifest.contract.cache
        return {"precision": manifest.graphs["decoder"].precision, "cache": cache.mode, "model": manifest.model,
                "weight_bytes": graph_weight_bytes(manifest.graph_path("decoder")),
                "kv_per_position": kv_bytes_per_position(cache.num_layers, cache.num_kv_heads, cache.head_dim,
                                                         cache.dtype)}
    cfg = pipe.model.cfg.to_dict()
    dec = cfg["decoder"]
    params = list(pipe.model.language_model.parameters()) + (
        list(pipe.model.lm_head.parameters()) if getattr(pipe.model, "lm_head", None) is not None else [])
    dtype = str(pipe.dtype).removeprefix("torch.")  # float32 on the CPU, float16 on CUDA
    return {"precision": float_name(dtype), "cache": f"preallocated (torch, {pipe.device.type})",
            "model": cfg, "weight_bytes": sum(p.numel() * p.element_size() for p in params),
            "kv_per_position": kv_bytes_per_position(dec["num_layers"], dec["num_kv_heads"], dec["head_dim"], dtype)}

