"""onnxruntime-genai as a `tgedge bench` peer: a worker process, run by a Python that has onnxruntime_genai (its own
onnxruntime), answering one JSON line per request on stdin with one JSON line of timings on stdout. It imports
nothing of tgedge (the file runs by path in that other environment).

    request  {"prompt_tokens": L, "new_tokens": N}
    reply    {"prompt_tokens": L, "prefill": s, "ttft": s, "decode_token": [s, ...], "load": 1-min load average}

The prompt is the token ids tgedge bench's text-only runs use (`ids_for`), greedy decoding of exactly N tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time


def ids_for(prompt_tokens: int, vocab: int):
    import numpy as np

    return ((np.arange(prompt_tokens, dtype=np.int64) * 7919 + 11) % (vocab - 1)) + 1


def with_threads(model_dir: str, threads: int) -> str:
    """A directory like `model_dir` whose genai_config.json sets the decoder's intra-op threads (0: unchanged)."""
    import tempfile

    if not threads:
        return model_dir
    out = tempfile.mkdtemp(prefix="tgedge-genai-")
    for name in os.listdir(model_dir):
        if name != "genai_config.json":
            os.symlink(os.path.join(os.path.abspath(model_dir), name), os.path.join(out, name))
    cfg = json.load(open(os.path.join(model_dir, "genai_config.json")))
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    json.dump(cfg, open(os.path.join(out, "genai_config.json"), "w"))
    return out


def serve(model_dir: str, threads: int = 0) -> None:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(with_threads(model_dir, threads))
    vocab = json.load(open(os.path.join(model_dir, "genai_config.json")))["model"]["vocab_size"]
    print(json.dumps({"ready": og.__version__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        n, length = request["new_tokens"], request["prompt_tokens"]
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=length + n, min_length=length + n)
        generator = og.Generator(model, params)
        out = {"prompt_tokens": length, "load": os.getloadavg()[0], "decode_token": []}
        start = time.perf_counter()
        generator.append_tokens(ids_for(length, vocab).astype(np.int32))  # the prompt through the model: prefill
        generator.generate_next_token()  # the first token, from the prefill's logits
        out["prefill"] = out["ttft"] = time.perf_counter() - start
        for _ in range(n - 1):
            s = time.perf_counter()
            generator.generate_next_token()  # one decode step and its greedy pick
            out["decode_token"].append(time.perf_counter() - s)
        del generator
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
