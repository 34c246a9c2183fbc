"""`scripts/gpu_check --run`'s copies phase: what a static KV cache's buffers do during decode steps (their addresses,
and on CUDA the memory copies CUPTI records through torch.profiler, each with its bytes)."""

from __future__ import annotations

import json
from pathlib import Path


def decode_copies(export: Path, backend: str, options: dict, steps: int = 8) -> dict:
    """Decode `steps` tokens after a 64-token prompt; what the cache's buffers did meanwhile (see Run.copies)."""
    from tgedge.bench.genai_worker import ids_for
    from tgedge.runtime.pipeline import Pipeline

    with Pipeline(export, backend, stages=("embed", "decoder"), runner_options=options) as pipe:
        x = pipe.embed_tokens(ids_for(64, pipe.manifest.model["decoder"]["vocab_size"])[None])
        pipe.setup_cache(64 + steps + 1)
        out = pipe.prefill(x)

        def addresses():
            return [b.data_ptr() if hasattr(b, "data_ptr") else b.ctypes.data for b in pipe.cache.buffers.values()]

        before = addresses()

        def decode():
            nonlocal out
            for i in range(steps):
                out = pipe.decode_one_token(int(out.argmax()), 64 + i)

        entry = {"steps": steps, "options": options, "cache_bound_once": pipe.cache.bound is not None}
        if backend == "onnxruntime-cuda":
            entry.update(cupti_copies(decode, steps, pipe.cache.layout))
        else:
            decode()
            entry["memcpy"] = "not counted on the CPU (CUPTI sees CUDA copies only)"
        entry["addresses_stable"] = addresses() == before
        pipe.clear_cache()
    return entry


def cupti_copies(decode, steps: int, layout) -> dict:
    """Memory copies during `decode()` as CUPTI records them (torch.profiler's trace: each copy's kind and bytes)."""
    import tempfile

    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    buffer_bytes = layout.num_kv_heads * layout.max_length * layout.head_dim * np.dtype(layout.dtype).itemsize
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    copies = [e for e in events if e.get("cat") == "gpu_memcpy"]
    sizes = [int(e.get("args", {}).get("bytes", 0)) for e in copies]
    return {"memcpy_per_step": round(len(copies) / steps, 2), "memcpy_bytes_per_step": round(sum(sizes) / steps),
            "cache_copies_per_step": round(sum(s >= buffer_bytes for s in sizes) / steps, 2),
            "cache_buffer_bytes": int(buffer_bytes),
            "kinds": sorted({e.get("name", "") for e in copies})}
