"""Build a TG-LLaVA checkpoint through the official TG-LLaVA code, with realistic random weights; check parity.

Run it with a Python that has the official code's dependencies (transformers==4.37.2, torch), not tgedge's venv:

    python scripts/official_checkpoint.py build  --official /tmp/tgllava --preset DIR -o OUT [--outliers N]
    python scripts/official_checkpoint.py parity --official /tmp/tgllava OUT --image IMG --prompt Q \
        [--tgedge "PYTHON -m tgedge"]

`--official` is a work tree of github.com/AIDC-AI/TG-LLaVA (nothing of it is copied here: it is imported from
there). `--preset DIR` is an output of `tgedge checkpoint random --preset ...`: its `config.json` gives the decoder
fields, its tokenizer files and its `clip/` directory (config, CLIP tokenizer, image processor) are reused; no
weight of it is read. The weights are random (labelled synthetic in `official_checkpoint.json`).

build, in the official code's own order (tg_llava/train/train_cross_zeroAdd_learnable_query.py with the options
of scripts/train/finetune_cross_zeroAdd.sh):
 1. OUT/clip: a transformers CLIPModel directory (ViT-L/14-336 widths, which the official TG modules hard-code;
    `--clip-layers` may shorten the towers for a small configuration), weights drawn by the rules below;
 2. LlavaQwenTextLearnableQueryForCausalLM(LlavaQwenConfig(decoder fields)) (the base LLM), then
    `initialize_vision_modules` / `initialize_text_modules` (vision tower, projector, text tower, TG-FOM, TG-DP)
    with `vision_tower = text_tower = OUT/clip`, and the config keys the training script sets;
 3. every weight the official code draws at random re-drawn by the rules (towers: in step 1), the official
    structural inits kept (norm gains 1, biases, the latents and learnable queries, position tables), except
    TG-FOM's zero_layer weight, which gets the rules' small non-zero scale so TG-FOM counts (its bias stays 0);
 4. optional outliers; then bf16 and `save_pretrained` (the official code's save path), tokenizer files beside.

The rules are tgedge's own (tgedge/presets_init.py, numpy-only, by tensor name), imported by file path
(`--rules`), so the official-code checkpoint and `tgedge checkpoint random --init realistic` share one table.

parity: the official code's greedy generation (tg_llava/deploy/runner.py's steps: the `qwen_2` conversation,
pad-to-square, tokenizer_image_token, the CLIP-tokenised question as text guide, the x2 view cut in 4 crops,
`model.generate`) on CPU in fp32, and, with `--tgedge`, tgedge's torch reference on the same image and question;
prints both token lists, whether they are equal, and the top-1 probability of each greedy token.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

# The official Q-Former starts from BertConfig.from_pretrained("google-bert/bert-large-uncased"): the public
# config.json of that model, served from a local hub cache (no network; nothing else of BERT is read).
BERT_LARGE_UNCASED = {
    "architectures": ["BertForMaskedLM"], "attention_probs_dropout_prob": 0.1, "gradient_checkpointing": False,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 1024, "initializer_range": 0.02,
    "intermediate_size": 4096, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert",
    "num_attention_heads": 16, "num_hidden_layers": 24, "pad_token_id": 0, "position_embedding_type": "absolute",
    "transformers_version": "4.6.0.dev0", "type_vocab_size": 2, "use_cache": True, "vocab_size": 30522}
# CLIP ViT-L/14-336 widths: the official TG-FOM / TG-DP hard-code 1024 (vision), 768 (text), 576 patches.
VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
TEXT_768 = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)
QWEN2_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
              "use_cache", "tie_word_embeddings", "rope_theta", "use_sliding_window", "sliding_window",
              "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
CLIP_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "preprocessor_config.json")
MARKER = "official_checkpoint.json"


def _offline_env(work: Path) -> None:
    """A hub cache holding only bert-large-uncased's config.json; hub access off. Before transformers is imported."""
    snap = work / "hub" / "models--google-bert--bert-large-uncased" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True, exist_ok=True)
    (snap / "config.json").write_text(json.dumps(BERT_LARGE_UNCASED, indent=2))
    refs = snap.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text("0" * 40)
    os.environ["HF_HUB_CACHE"] = str(work / "hub")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _stub_deepspeed() -> None:
    """llava_arch imports deepspeed at the top; only its pretrained-adapter loading (not used here) calls it."""
    if "deepspeed" in sys.modules:
        return
    try:
        import deepspeed  # noqa: F401
        return
    except ImportError:
        pass

    def _unavailable(*a, **k):
        raise RuntimeError("deepspeed is stubbed by official_checkpoint.py: this code path is not supported")

    ds = types.ModuleType("deepspeed")
    ds.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)  # transformers probes find_spec("deepspeed")
    ds.zero = types.SimpleNamespace(GatheredParameters=_unavailable)
    ds.comm = types.SimpleNamespace(get_rank=_unavailable)
    sys.modules["deepspeed"] = ds


def import_official(official: Path):
    """The official package `tg_llava`, imported from its work tree."""
    if not (official / "tg_llava" / "model" / "llava_arch_cross_zeroAdd_learnable_query.py").is_file():
        sys.exit(f"--official {official}: not a TG-LLaVA work tree (no tg_llava/model/llava_arch_*.py)")
    _stub_deepspeed()
    sys.path.insert(0, str(official))
    import tg_llava  # noqa: F401
    from tg_llava.model.language_model import llava_qwen2_cross_zeroAdd_learnable_query as qwen
    return qwen


def load_rules(path: Path):
    """tgedge/presets_init.py by file path (it imports tgedge.errors: its repository root goes on sys.path)."""
    root = str(path.resolve().parent.parent)
    sys.path.insert(0, root)
    try:
        spec = importlib.util.spec_from_file_location("tgedge_presets_init", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its dataclasses look their module up
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(root)
    return mod


@dataclasses.dataclass
class Spec:  # what presets_init.realistic_scale reads of a tensor
    name: str
    shape: tuple
    init: str = "normal"
    std: object = None  # None back from the rules: keep the official code's values


class Drawer:
    """Realistic values by the rules: W ~ N(0, std^2), vocabulary rows times log-normal factors; per-name seeds."""

    def __init__(self, rules, seed: int):
        self.rules, self.seed, self.log = rules, seed, {}

    def generator(self, name: str):
        import torch
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{self.seed}/{name}".encode()).digest()[:8],
                                                         "little") & (2**63 - 1))
        return g

    def apply(self, named_params, skip=()):
        import torch
        for name, p in named_params:
            if any(name.startswith(s) for s in skip):
                continue
            std, spread = self.rules.realistic_scale(Spec(name, tuple(p.shape)))
            if std is None:
                continue
            g = self.generator(name)
            x = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            if spread:
                z = torch.randn(p.shape[0], generator=self.generator(name + "#rows"), dtype=torch.float32)
                x *= torch.exp(spread * z - spread ** 2).view(-1, *([1] * (x.dim() - 1)))
            with torch.no_grad():
                p.copy_(x.to(p.dtype))
            self.log[name] = {"std": round(float(std), 6), "row_spread": spread}


def plant_outliers(rules, named_params, tower: str, channels, log: dict):
    """Norm gains (and LayerNorm biases) x OUTLIER_GAIN on `channels`, the Linear input columns they feed / as much."""
    import torch
    site = next(s for s in rules.OUTLIER_SITES if s.tower == tower)
    gain = float(rules.OUTLIER_GAIN)
    idx = torch.tensor(list(channels))
    for name, p in named_params:
        with torch.no_grad():
            if re.search(site.gains, name):
                p[..., idx] *= gain
                log.setdefault(tower, {}).setdefault("gains", []).append(name)
            elif re.search(site.columns, name):
                p[..., idx] /= gain
                log.setdefault(tower, {}).setdefault("columns", []).append(name)


def _channels(rules, seed: int, tower: str, width: int, n: int):
    import numpy as np
    if n > width // 4:
        sys.exit(f"--outliers {n}: at most a quarter of the {tower}'s {width} channels")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}/outliers/{tower}".encode()).digest()[:8],
                                               "little"))
    return tuple(sorted(int(c) for c in rng.choice(width, n, replace=False)))


def build(a) -> None:
    t0 = time.time()
    out, preset = Path(a.out), Path(a.preset)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file() and not a.force:
            sys.exit(f"-o {out}: not empty and not an earlier output of this script (use --force)")
    work = Path(tempfile.mkdtemp(prefix=".official-", dir=out.parent))
    _offline_env(work)
    rules_path = Path(a.rules) if a.rules else Path(__file__).resolve().parent.parent / "tgedge" / "presets_init.py"
    if not rules_path.is_file():
        sys.exit(f"--rules {rules_path}: no such file (tgedge/presets_init.py of a tgedge checkout)")
    rules = load_rules(rules_path)
    qwen = import_official(Path(a.official))
    import torch
    import transformers
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    torch.manual_seed(a.seed)
    tmp = work / "ckpt"
    clip_dir = tmp / "clip"
    clip_dir.mkdir(parents=True)
    drawer = Drawer(rules, a.seed)
    log = {"outliers": {}}

    # 1. the CLIP directory (both towers), realistic values, outliers in the vision tower
    src = json.loads((preset / "clip" / "config.json").read_text())
    src["vision_config"].update(VIT_L_336)
    src["text_config"].update(TEXT_768)
    if a.clip_layers:
        src["vision_config"]["num_hidden_layers"], src["text_config"]["num_hidden_layers"] = a.clip_layers
    src.pop("torch_dtype", None)
    clip = CLIPModel(CLIPConfig(**{k: v for k, v in src.items() if k not in ("architectures", "model_type")}))
    drawer.apply(clip.named_parameters())
    dec = json.loads((preset / "config.json").read_text())
    if a.decoder_layers:
        dec["num_hidden_layers"] = dec["max_window_layers"] = a.decoder_layers
    if a.outliers:
        log["outliers"]["channels"] = {
            "vision": _channels(rules, a.seed, "vision", clip.config.vision_config.hidden_size, a.outliers),
            "decoder": _channels(rules, a.seed, "decoder", dec["hidden_size"], a.outliers)}
        plant_outliers(rules, clip.named_parameters(), "vision", log["outliers"]["channels"]["vision"],
                       log["outliers"])
    clip.to(torch.bfloat16).save_pretrained(clip_dir, safe_serialization=True)
    for f in CLIP_FILES:
        if (preset / "clip" / f).is_file():
            shutil.copy2(preset / "clip" / f, clip_dir / f)
    pp = json.loads((clip_dir / "preprocessor_config.json").read_text())  # 336 px, as the towers
    size = VIT_L_336["image_size"]
    pp["size"] = {"shortest_edge": size} if isinstance(pp.get("size"), dict) else size
    pp["crop_size"] = {"height": size, "width": size} if isinstance(pp.get("crop_size"), dict) else size
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")
    del clip

    # 2. the official model, built as the training script builds it
    config = qwen.LlavaQwenConfig(**{k: dec[k] for k in QWEN2_KEYS if k in dec})
    model = qwen.LlavaQwenTextLearnableQueryForCausalLM(config)  # the base LLM (from_pretrained in training)
    for f in TOKENIZER_FILES:
        if (preset / f).is_file():
            shutil.copy2(preset / f, tmp / f)
    tokenizer = AutoTokenizer.from_pretrained(tmp, model_max_length=2048, padding_side="right")
    model_args = types.SimpleNamespace(  # scripts/train/finetune_cross_zeroAdd.sh; ModelArguments' defaults else
        vision_tower=str(clip_dir.resolve()), text_tower=str(clip_dir.resolve()), mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu", mm_patch_merge_type="flat",
        mm_use_im_start_end=False, mm_use_im_patch_token=False, tune_mm_mlp_adapter=False,
        pretrain_mm_mlp_adapter=None, pretrain_mm_cross_attn=None, pretrain_mm_patch_encoder=None)
    model.get_model().initialize_vision_modules(model_args=model_args, fsdp=None)
    model.get_model().initialize_text_modules(model_args=model_args)
    mc = model.config
    mc.image_aspect_ratio = "pad"
    mc.tokenizer_padding_side = tokenizer.padding_side
    mc.tokenizer_model_max_length = tokenizer.model_max_length
    mc.tune_mm_mlp_adapter = False
    mc.freeze_mm_mlp_adapter = False
    mc.mm_use_im_start_end = False
    mc.mm_projector_lr = None
    mc.mm_use_im_patch_token = False
    model.initialize_vision_tokenizer(model_args, tokenizer=tokenizer)
    mc.use_cache = True

    # 3. realistic values (towers already drawn in 1.; structural inits kept), 4. decoder outliers
    zero = model.get_model().mm_cross_attn.zero_layer
    assert not zero.weight.any() and not zero.bias.any(), "the official zero_layer is expected to start at 0"
    drawer.apply(model.named_parameters(), skip=("model.vision_tower.", "model.text_tower."))
    if a.outliers:
        plant_outliers(rules, model.named_parameters(), "decoder", log["outliers"]["channels"]["decoder"],
                       log["outliers"])
    model.to(torch.bfloat16)
    mc.torch_dtype = torch.bfloat16
    model.save_pretrained(tmp, safe_serialization=True)  # the official code's save path (HF save_pretrained)
    n_params = sum(p.numel() for p in model.parameters())
    rel_clip = os.path.relpath(clip_dir, tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    for k in ("mm_vision_tower", "mm_text_tower"):  # point at the CLIP directory's final place
        cfg[k] = str((out / rel_clip).resolve())
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (tmp / MARKER).write_text(json.dumps({
        "synthetic": "RANDOM WEIGHTS: built through the official TG-LLaVA code, realistic random init; not a "
                     "trained model, its answers are noise",
        "official_commit": _git_head(Path(a.official)), "preset": str(preset), "seed": a.seed,
        "rules": str(rules_path), "rules_sha256": hashlib.sha256(rules_path.read_bytes()).hexdigest(),
        "outliers": a.outliers, "outlier_gain": float(rules.OUTLIER_GAIN) if a.outliers else None,
        "outlier_channels": log["outliers"].get("channels"), "clip_layers": a.clip_layers,
        "decoder_layers": a.decoder_layers, "parameters_in_model": n_params,
        "zero_layer": "weight drawn by the rules (non-zero, so TG-FOM counts); bias kept at the official 0",
        "kept_official_init": sorted({_kind(n) for n, _ in model.named_parameters()
                                      if n not in drawer.log and not n.startswith(("model.vision_tower.",
                                                                                   "model.text_tower."))}),
        "drawn": drawer.log, "transformers": transformers.__version__, "torch": torch.__version__,
        "seconds": round(time.time() - t0, 1)}, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    shutil.rmtree(work)
    print(f"wrote {out} ({n_params / 1e9:.3f} B parameters in the official model, towers included) "
          f"and {out / rel_clip} in {time.time() - t0:.0f} s; RANDOM WEIGHTS")


def _kind(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def _git_head(official: Path):
    try:
        return subprocess.run(["git", "-C", str(official), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def official_generate(a):
    """The official runner's steps on CPU, fp32; greedy; returns (tokens, top-1 probabilities, prompt ids)."""
    work = Path(tempfile.mkdtemp(prefix="official-hub-"))
    _offline_env(work)
    qwen = import_official(Path(a.official))
    import torch
    import transformers
    from PIL import Image
    from tg_llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from tg_llava.conversation import conv_templates
    from tg_llava.mm_utils import process_images, tokenizer_image_token
    torch.set_num_threads(a.threads)
    ckpt = Path(a.checkpoint)
    # tg_llava/model/builder.py's 'cross' + 'qwen' branch, on CPU in fp32 (it hard-codes cuda:0 and fp16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    model = qwen.LlavaQwenTextLearnableQueryForCausalLM.from_pretrained(ckpt, low_cpu_mem_usage=True,
                                                                        torch_dtype=torch.float32)
    if getattr(model.config, "mm_use_im_patch_token", True):
        tokenizer.add_tokens(["<im_patch>"], special_tokens=True)
    model.resize_token_embeddings(len(tokenizer))
    vt, tt = model.get_vision_tower(), model.get_text_tower()
    if not vt.is_loaded:
        vt.load_model()
    if not tt.is_loaded:
        tt.load_model()
    vt.to(dtype=torch.float32)
    tt.to(dtype=torch.float32)
    model.eval()
    image_processor = vt.image_processor
    # tg_llava/deploy/runner.py
    qs = DEFAULT_IMAGE_TOKEN + "\n" + a.prompt
    conv = conv_templates["qwen_2"].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    image = Image.open(a.image).convert("RGB")
    images_tensor = process_images([image], image_processor, model.config).to(dtype=torch.float32)
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    tokenizer_clip = transformers.AutoTokenizer.from_pretrained(model.config.mm_text_tower)
    text_guide_ids = torch.tensor(tokenizer_clip(qs.replace("<image>", "").strip()).input_ids, dtype=torch.long)
    img_resized = torch.nn.functional.interpolate(images_tensor, scale_factor=2, mode="bilinear",
                                                  align_corners=False).squeeze(0)
    img_patches = [torch.stack([img_resized[:, 0:336, 0:336], img_resized[:, 0:336, 336:336 * 2],
                                img_resized[:, 336:336 * 2, 0:336], img_resized[:, 336:336 * 2, 336:336 * 2]])]
    t0 = time.time()
    with torch.inference_mode():
        out = model.generate(input_ids, text_guide_ids, img_patches, images=images_tensor,
                             image_sizes=[image.size], do_sample=False, num_beams=1, temperature=None, top_p=None,
                             max_new_tokens=a.max_new_tokens, use_cache=True, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    seconds = time.time() - t0
    tokens = out.sequences[0, out.sequences.shape[1] - len(out.scores):].tolist()  # 4.37 may prepend a BOS
    probs, margins = [], []
    for step, s in enumerate(out.scores):
        p = torch.softmax(s[0].float(), -1)
        top2 = torch.topk(p, 2)
        probs.append(round(float(p[tokens[step]]), 4))
        margins.append(round(float(torch.log(top2.values[0] / top2.values[1])), 3))
    shutil.rmtree(work)
    return {"tokens": tokens, "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "top1_prob": probs, "top1_top2_logit_margin": margins, "prompt": prompt,
            "prompt_ids": input_ids[0].tolist(), "text_guide_ids": text_guide_ids.tolist(),
            "generate_seconds": round(seconds, 1)}


def parity(a) -> None:
    off = official_generate(a)
    result = {"official": off}
    if a.tgedge:
        clip = json.loads((Path(a.checkpoint) / "config.json").read_text())["mm_vision_tower"]
        cmd = a.tgedge.split() + ["run", a.checkpoint, "--clip", clip, "--image", a.image, "--prompt", a.prompt,
                                  "--json", "--max-new-tokens", str(a.max_new_tokens)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"tgedge run failed ({p.returncode}):\n{p.stderr[-4000:]}")
        tg = json.loads(p.stdout)
        result["tgedge"] = {k: tg.get(k) for k in ("tokens", "text", "prompt_tokens")}
        n = len(tg["tokens"])
        # tgedge stops before/at its stop tokens as the official generate does; compare what both produced
        result["equal"] = off["tokens"][:n] == tg["tokens"] and len(off["tokens"]) in (n, n + 1)
    print(json.dumps(result, indent=1))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=1) + "\n")
    if a.tgedge and not result["equal"]:
        sys.exit(1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a checkpoint through the official code")
    b.add_argument("--official", required=True, help="TG-LLaVA work tree")
    b.add_argument("--preset", required=True, help="a `tgedge checkpoint random` output (config, tokenizers, clip/)")
    b.add_argument("-o", "--out", required=True)
    b.add_argument("--rules", help="tgedge/presets_init.py (default: the one of this checkout)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--outliers", type=int, default=0, help="outlier channels per tower (decoder, vision); 0: none")
    b.add_argument("--clip-layers", type=int, nargs=2, metavar=("VISION", "TEXT"),
                   help="shorter CLIP towers (small configurations); widths stay ViT-L/14-336's")
    b.add_argument("--decoder-layers", type=int, help="fewer decoder layers (small configurations)")
    b.add_argument("--force", action="store_true")
    b.set_defaults(fn=build)
    p = sub.add_parser("parity", help="official greedy generation vs tgedge's torch reference")
    p.add_argument("checkpoint")
    p.add_argument("--official", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", default="What is in the picture?")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--tgedge", help='how to run tgedge, e.g. "/work/wt-official/.venv/bin/python -m tgedge"')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out")
    p.set_defaults(fn=parity)
    a = ap.parse_args(argv)
    a.fn(a)


if __name__ == "__main__":
    main()
