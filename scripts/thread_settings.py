"""Decode-step time of an export's decoder (static or growing cache) under onnxruntime thread settings: default
(one thread per core, spinning), no spinning, one thread; three rounds alternating (docs/BENCHMARKS.md).

    python scripts/thread_settings.py EXPORT_DIR
"""
import sys, numpy as np, onnxruntime as ort, time
from tgedge.runtime.manifest import Manifest
from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx
from tgedge.runtime.cache import make_cache
d = sys.argv[1]; m = Manifest.load(d)
def make(opts):
    so = ort.SessionOptions(); so.log_severity_level = 3
    for k, v in opts.items():
        if k == "threads": so.intra_op_num_threads = v
        else: so.add_session_config_entry(k, v)
    class L(SessionFromOnnx):
        def __call__(self): return ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
    r = OnnxRuntimeRunner(L(m.graph_path("decoder")), "decoder"); r.activate(); return r
D = m.model["decoder"]["hidden_size"]; rng = np.random.default_rng(0)
configs = {"default": {}, "nospin": {"session.intra_op.allow_spinning": "0"}, "1thread": {"threads": 1}}
runners = {k: make(v) for k, v in configs.items()}
for rnd in range(3):
    for k, r in runners.items():
        cache = make_cache(m.contract.cache); T = 64; cache.reset(T + 40, r)
        out = r.infer({"inputs_embeds": rng.standard_normal((1, T, D), np.float32) * 0.02, **cache.feed(T)}, **cache.options); cache.update(out, T)
        ts = []
        for i in range(20):
            s = time.perf_counter()
            out = r.infer({"inputs_embeds": rng.standard_normal((1, 1, D), np.float32) * 0.02, **cache.feed(1)}, **cache.options); cache.update(out, 1)
            ts.append(time.perf_counter() - s)
        print(rnd, k, "decode ms median", round(1e3 * np.median(ts), 1), "min", round(1e3 * min(ts), 1), flush=True)
