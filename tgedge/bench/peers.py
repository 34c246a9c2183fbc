"""The bench's peers: other libraries running the same weights, each timing itself (`bench_run(settings)`) and
describing itself (`describe()`) for the floors.

onnxruntime-genai (`GenaiPeer`) runs in a worker process of a Python that has it (tgedge/bench/genai_worker.py).

transformers `LlavaForConditionalGeneration.generate` (`TransformersPeer`) runs plain-LLaVA checkpoints. transformers
has LLaVA but no TG-LLaVA modules, so the peer runs a plain-LLaVA checkpoint: the export's own source
checkpoint when it is plain LLaVA, else the twin the user names (`tgedge checkpoint random --preset llava-...`: the
TG preset's CLIP tower and decoder, without TG-FOM / TG-DP). The checkpoint is read by tgedge (every layout it reads)
and its tensors are handed to a `LlavaForConditionalGeneration` built from the same config (`load_state_dict(...,
assign=True)`: shared, not copied), so both sides run the very same weights (fp32 on the CPU, fp16 on CUDA).

Inputs are tgedge's preprocessing (the same pixels and prompt ids; the image positions carry the twin's image token
id), decoding is greedy with exactly N new tokens (EOS held off by `min_new_tokens`), transformers' own cache (its
default, a DynamicCache) and attention (its default, SDPA). Times are taken inside `generate`: forward hooks on the
vision tower and the projector give the vision and fusion stages, a logits processor stamps the moment each token's
logits arrive (the first: TTFT; the differences: one decode step each, generate's own per-step work included).
On CUDA (`device="cuda"`: the weights loaded there in fp16, the inputs moved there) each stamp waits for the device
first (`torch.cuda.synchronize`), so that it marks logits computed, not kernels queued.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from tgedge.errors import TgedgeError
from tgedge.precision import REFERENCE, float_name


def twin_config(cfg, image_token_index: int) -> dict:
    """A transformers LlavaConfig dict for a tgedge ModelConfig of a plain-LLaVA model."""
    from tgedge.checkpoint import config_json

    out = config_json(cfg)
    out.pop("architectures", None)
    out["image_token_index"] = image_token_index
    return out


def build_twin(model, cfg):
    """A transformers LlavaForConditionalGeneration holding tgedge's plain-LLaVA `model`'s tensors (not copies)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():  # parameters allocated, never written: replaced at once by tgedge's (their pages untouched)
        # the image token id: the checkpoint's, else a placeholder until a prompt's ids choose one (ids_with_image)
        twin = LlavaForConditionalGeneration(LlavaConfig(**twin_config(cfg, cfg.image_token_index or 0)))
    ours = {("" if k.startswith("lm_head.") else "model.") + k: v for k, v in model.state_dict().items()}
    theirs = twin.state_dict()
    tied = {"lm_head.weight"} if cfg.decoder.tie_word_embeddings else set()
    missing, extra = sorted(set(theirs) - set(ours) - tied), sorted(set(ours) - set(theirs))
    if missing or extra:
        raise TgedgeError(f"transformers' LLaVA and tgedge's do not hold the same tensors (missing {missing[:3]}, "
                          f"extra {extra[:3]})")
    twin.load_state_dict(ours, strict=False, assign=True)
    if tied:
        twin.lm_head.weight = twin.model.language_model.embed_tokens.weight
    return twin.eval()


class TransformersPeer:
    """`LlavaForConditionalGeneration.generate` on a plain-LLaVA checkpoint, in this process (torch: fp32 on the CPU,
    fp16 on CUDA)."""

    def __init__(self, checkpoint: str, clip: str | None, device: str = "cpu"):
        try:
            import transformers
        except ImportError:
            raise TgedgeError("--compare transformers needs transformers (pip install transformers)") from None
        from tgedge.checkpoint import load_checkpoint, model_of
        from tgedge.reference import torch_device

        self.device, self.dtype = torch_device(device)  # before any loading

        ckpt = load_checkpoint(checkpoint, clip)  # its config, and its weights read lazily: nothing loaded yet
        if ckpt.config.has_tg:
            raise TgedgeError(f"--compare transformers: {checkpoint} is a text-guided checkpoint and transformers has "
                              "no TG modules: --transformers-model takes a plain-LLaVA checkpoint (a TG preset's "
                              "twin: tgedge checkpoint random --preset llava-...)")
        self.cfg, self.pre, self.version = ckpt.config, ckpt.preprocessor, transformers.__version__
        self.model = build_twin(model_of(ckpt, self.device, self.dtype), ckpt.config).to(self.device)  # its buffers
        self.context = ckpt.config.decoder.max_position_embeddings

    # -- one generate, timed ----------------------------------------------------------------------------------------
    def generate(self, input_ids, pixel_values=None, new_tokens: int = 16) -> dict:
        """Greedy `generate` of exactly `new_tokens`; -> tokens, seconds in vision and projector, and the moments
        (perf_counter) generate started and each token's logits arrived."""
        import torch
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps, stages = [], {}
        cuda = self.device == "cuda"

        def now() -> float:
            if cuda:
                torch.cuda.synchronize()  # what was queued is done: the moment is the computation's
            return time.perf_counter()

        class Stamp(LogitsProcessor):
            def __call__(self, ids, scores):
                stamps.append(now())
                return scores

        def clocked(module, name):
            entered = []
            pre = module.register_forward_pre_hook(lambda *_: entered.append(now()))
            post = module.register_forward_hook(
                lambda *_: stages.__setitem__(name, stages.get(name, 0.0) + now() - entered.pop()))
            hooks.extend((pre, post))

        hooks = []
        started = time.perf_counter()
        try:
            clocked(self.model.model.vision_tower, "vision")
            clocked(self.model.model.multi_modal_projector, "fusion")
            with torch.inference_mode():
                ids = torch.as_tensor(input_ids).to(self.device)
                # no pixel_values key at all for text-only prompts: generate takes a key given as None for an image
                image = {} if pixel_values is None else {
                    "pixel_values": torch.as_tensor(pixel_values).to(self.device, self.dtype)}
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), **image, do_sample=False,
                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0)
        finally:
            for h in hooks:
                h.remove()
        tokens = out[0, input_ids.shape[1]:].tolist()
        return {"tokens": tokens, "started": started, "stamps": stamps, **stages}

    def ids_with_image(self, inputs):
        """tgedge's prompt ids with the image positions holding the twin's image token id, which is set on the twin's
        config too (its LlavaModel finds the image positions by it): the checkpoint's own, else (the original layout
        has none: tgedge's ids carry a placeholder there) the highest id the prompt lacks."""
        import numpy as np

        ids = np.asarray(inputs.input_ids, np.int64).copy()
        image = ids == self.pre.spec.image_token_id
        chosen = self.cfg.image_token_index
        if chosen is None:
            chosen = int(np.setdiff1d(np.arange(self.cfg.decoder.vocab_size), ids[~image])[-1])
        ids[image] = chosen
        self.model.config.image_token_index = chosen  # one config object, shared with self.model.model
        return ids

    # -- the bench protocol (tgedge.bench.run: bench_run, describe) ---------------------------------------------------
    def bench_run(self, settings) -> dict:
        from tgedge.bench.genai_worker import ids_for

        out = {}
        if settings.image is not None:
            load, start = os.getloadavg()[0], time.perf_counter()
            inputs = self.pre(settings.image, settings.prompt)  # tgedge's preprocessing, as tgedge's runs time it
            preprocess = time.perf_counter() - start
            ids = self.ids_with_image(inputs)  # the twin's image id: not preprocessing, left out of TTFT
            run = self.generate(ids, inputs.pixel_values, settings.new_tokens)
            out["image"] = self._timings(run, run["started"] - preprocess, load, preprocess=preprocess,
                                         views=int(inputs.pixel_values.shape[0]), prompt_tokens=int(ids.shape[1]))
        for n in settings.prompt_tokens:
            ids = ids_for(n, self.cfg.decoder.vocab_size)[None]
            load = os.getloadavg()[0]
            run = self.generate(ids, None, settings.new_tokens)
            out[f"context:{n}"] = self._timings(run, run["started"], load, prompt_tokens=n)
        return out

    @staticmethod
    def _timings(run: dict, start: float, load: float, **extra) -> dict:
        """TTFT from `start` (preprocessing included); prefill: generate's time to the first logits, less the
        vision tower and projector; each decode step: the time between two tokens' logits."""
        stamps = run["stamps"]
        encode = run.get("vision", 0.0) + run.get("fusion", 0.0)
        out = {"load": load, "ttft": stamps[0] - start,
               "prefill": stamps[0] - run["started"] - encode,
               "decode_token": [b - a for a, b in zip(stamps, stamps[1:])], **extra}
        out.update({k: run[k] for k in ("vision", "fusion") if k in run})
        return out

    def describe(self) -> dict:
        from tgedge.floors import kv_bytes_per_position

        d = self.cfg.decoder
        params = {id(p): p for p in [*self.model.model.language_model.parameters(), *self.model.lm_head.parameters()]}
        dtype = str(self.dtype).removeprefix("torch.")
        return {"precision": float_name(dtype), "cache": f"dynamic (transformers {self.version}, {self.device})",
                "weight_bytes": sum(p.numel() * p.element_size() for p in params.values()),
                "kv_per_position": kv_bytes_per_position(d.num_layers, d.num_kv_heads, d.head_dim, dtype),
                "model": self.cfg.to_dict()}


class GenaiPeer:
    """onnxruntime-genai over its builder's output (`python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p
    fp32|int4 -e cpu`), in a worker process of `python` (an environment with onnxruntime_genai: it brings its own
    onnxruntime); text-only prompts, the same token ids as tgedge's text-only runs (tgedge/bench/genai_worker.py)."""
    separate_process = True  # its memory is the worker's, not this process's

    def __init__(self, model_dir: str, python: str, threads: int = 0):
        self.model_dir = model_dir
        worker = Path(__file__).with_name("genai_worker.py")
        try:
            # isolated (-I): the working directory is not on its path (a user's files never shadow a module)
            run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
            self.proc = subprocess.Popen([python, "-I", "-c", run, str(worker), model_dir, str(threads)],
                                         stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise TgedgeError(f"--genai-python {python}: cannot start it ({e.strerror})") from None
        ready = self.proc.stdout.readline()
        if not ready:
            err = self.proc.stderr.read().strip().splitlines()
            raise TgedgeError(f"onnxruntime-genai worker ({python}) failed: {err[-1] if err else 'no output'}")

    def bench_run(self, settings) -> dict:
        out = {}
        for n in settings.prompt_tokens:
            self.proc.stdin.write(json.dumps({"prompt_tokens": n, "new_tokens": settings.new_tokens}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
            if not line:
                raise TgedgeError(f"onnxruntime-genai worker stopped: {self.proc.stderr.read().strip()[-300:]}")
            out[f"context:{n}"] = json.loads(line)
        return out

    def describe(self) -> dict:
        from tgedge.floors import graph_weight_bytes, kv_bytes_per_position

        cfg = json.loads((Path(self.model_dir) / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        onnx_file = Path(self.model_dir) / dec["filename"]
        return {"precision": "int4" if "int4" in str(self.model_dir) or _has_nbits(onnx_file) else REFERENCE.name,
                "cache": "static (onnxruntime-genai)", "weight_bytes": graph_weight_bytes(onnx_file),
                "kv_per_position": kv_bytes_per_position(dec["num_hidden_layers"], dec["num_key_value_heads"],
                                                         dec["head_size"]),
                "model": {"decoder": {"hidden_size": dec["hidden_size"], "num_layers": dec["num_hidden_layers"],
                                      "num_heads": dec["num_attention_heads"], "head_dim": dec["head_size"],
                                      "num_kv_heads": dec["num_key_value_heads"], "vocab_size": cfg["vocab_size"],
                                      "intermediate_size": _intermediate(onnx_file)}}}

    def peak_rss(self) -> int:
        """The worker's own peak resident memory (it is another process)."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
            return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:"))) * 1024
        except (OSError, StopIteration, ValueError):
            return 0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def _has_nbits(path: Path) -> bool:
    import onnx

    return any(n.op_type == "MatMulNBits" for n in onnx.load(str(path), load_external_data=False).graph.node)


def _intermediate(path: Path) -> int:
    """The MLP width from the graph (genai_config does not carry it): the first down projection's K."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        if "down_proj" in node.name and node.op_type in ("MatMul", "MatMulNBits"):
            if node.op_type == "MatMulNBits":
                return next(a.i for a in node.attribute if a.name == "K")
            init = next(t for t in proto.graph.initializer if t.name == node.input[1])
            return int(init.dims[0])
    raise TgedgeError(f"{path}: no down_proj MatMul to read the MLP width from")
