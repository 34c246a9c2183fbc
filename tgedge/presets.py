"""Random checkpoints at real sizes, in the original TG-LLaVA / LLaVA layout (b), for `tgedge checkpoint random`.

The weights are random: such a checkpoint answers noise. It exists for memory, time and shape tests of the
real architectures (CLIP ViT-L/14-336 towers, TG-FOM, TG-DP, Qwen2 / LLaMA decoders) without downloads.
It is written tensor by tensor (safetensors written here, header first, then each tensor generated in
chunks and dropped), so writing a 7 B model takes tens of MB of memory. Each tensor is drawn from its own
seed (the preset seed and the tensor's name): the files are byte-identical for a seed, whatever the order.
How large each tensor's values are (`--init flat|realistic`, planted outlier channels) is presets_init's.

Layout: `DIR/` holds the checkpoint (`config.json` with `mm_*` keys, decoder weights named `model.*`,
`model.mm_projector.*`, `model.mm_cross_attn.*`, `model.mm_patch_encoder.*`, a synthetic `tokenizer.json`
with exactly `vocab_size` entries); `DIR/clip/` is a transformers CLIPModel directory (both towers, the
CLIP tokenizer with 49408 entries, the image processor). Numpy only: no torch needed to write one.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tgedge import config as C
from tgedge.layouts import original
from tgedge.errors import TgedgeError, TgedgeInternalError, os_error

MARKER = "random_checkpoint.json"  # marks a directory this command wrote (it may be replaced); layouts/original.py
# finds CKPT/CLIP_SUBDIR by it, so that such a checkpoint needs no --clip
CLIP_SUBDIR = "clip"
STD = 0.02  # the initializer_range of CLIP, BERT, LLaMA and Qwen2 configs: activations stay O(1)
ZERO_LAYER_STD = 0.01  # TG-FOM's zero_layer starts at 0; non-zero so TG-FOM counts (~10% of the ViT-L features)
DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "fp16": ("F16", 2, "float16"), "fp32": ("F32", 4, "float32")}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size
_CHUNK = 1 << 22  # elements generated at a time


@dataclass(frozen=True)
class ClipSpec:
    """A CLIPModel as its public config.json gives it, plus the sizes of the reference's BERT Q-Former tables."""
    name: str
    vision: dict
    text: dict
    projection_dim: int
    qformer_vocab: int = 30522  # bert-large-uncased, whose config the reference's Q-Former starts from
    qformer_positions: int = 512


@dataclass(frozen=True)
class Base:
    """One decoder + CLIP pairing; each gives a TG preset (`tg-KEY`) and its plain-LLaVA twin (`llava-KEY`)."""
    key: str
    title: str
    family: str
    decoder: dict  # the decoder's config.json fields (top level in the original layout)
    specials: dict  # token -> id, at the real tokenizer's ids
    unk: str
    bos: str | None
    eos: list  # generation stops at these
    clip: ClipSpec
    tg_overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Preset:
    name: str
    base: Base
    tg: bool

    @property
    def model_type(self) -> str:
        qwen = self.base.family == "qwen2"
        if self.tg:
            return "llava_qwen_text_learnable_query" if qwen else "llava_llama_text_learnable_query"
        return "llava_qwen2" if qwen else "llava_llama"

    @property
    def architecture(self) -> str:
        qwen = self.base.family == "qwen2"
        if self.tg:
            return "LlavaQwenTextLearnableQueryForCausalLM" if qwen else "LlavaLlamaTextLearnableQueryForCausalLM"
        return "LlavaQwen2ForCausalLM" if qwen else "LlavaLlamaForCausalLM"


@dataclass(frozen=True)
class TensorSpec:
    group: str  # "model" (DIR) or "clip" (DIR/clip)
    name: str
    shape: tuple
    init: str  # normal | one (1 + noise) | arange (int64) | const
    std: float = STD
    used: bool = True  # False: saved by the reference (or CLIP) but not loaded by tgedge
    channels: tuple = ()  # last-axis indices multiplied by channel_scale (planted outliers, presets_init)
    channel_scale: float = 1.0
    row_spread: float = 0.0  # > 0: each row's values times a log-normal factor of this sigma (and rms 1)
    signs: bool = False  # every value times a random sign, drawn from the seed (the realistic decoder's final norm)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self, dtype: str) -> int:
        return self.numel * (8 if self.init == "arange" else DTYPES[dtype][1])


VIT_L_336 = ClipSpec(
    "openai/clip-vit-large-patch14-336",
    vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=336, patch_size=14),
    text=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77),
    projection_dim=768)
CLIP_TINY = ClipSpec(
    "tgedge/clip-tiny",
    vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                patch_size=14),
    text=dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=77),
    projection_dim=32, qformer_vocab=64, qformer_positions=32)

_QWEN2 = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
              max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645, use_sliding_window=False,
              sliding_window=32768, attention_dropout=0.0, initializer_range=STD, use_cache=True)
_QWEN2_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
BASES = [
    Base("qwen2-0.5b", "Qwen2-0.5B", "qwen2",
         dict(_QWEN2, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
              num_attention_heads=14, num_key_value_heads=2, max_window_layers=24),
         _QWEN2_SPECIALS, "<|endoftext|>", None, ["<|im_end|>", "<|endoftext|>"], VIT_L_336),
    Base("qwen2-1.5b", "Qwen2-1.5B", "qwen2",
         dict(_QWEN2, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, max_window_layers=28),
         _QWEN2_SPECIALS, "<|endoftext|>", None, ["<|im_end|>", "<|endoftext|>"], VIT_L_336),
    Base("vicuna-7b", "Vicuna-7B (LLaMA-7B)", "llama",
         dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", rms_norm_eps=1e-5,
              rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False, attention_bias=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0, pretraining_tp=1, initializer_range=STD,
              use_cache=True),
         {"<unk>": 0, "<s>": 1, "</s>": 2}, "<unk>", "<s>", ["</s>"], VIT_L_336),
    Base("tiny", "tiny Qwen2-style", "qwen2",
         dict(_QWEN2, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, max_window_layers=2,
              sliding_window=1024, bos_token_id=509, eos_token_id=511),
         {"<|endoftext|>": 509, "<|im_start|>": 510, "<|im_end|>": 511}, "<|endoftext|>", None,
         ["<|im_end|>", "<|endoftext|>"], CLIP_TINY,
         tg_overrides=dict(tg_fom_num_heads=4, tg_dp_num_latents=8, tg_dp_num_heads=4, tg_dp_head_dim=16,
                           tg_dp_num_kv_heads=2)),
]
PRESETS = {p.name: p for b in BASES for p in (Preset(f"tg-{b.key}", b, True), Preset(f"llava-{b.key}", b, False))}


def get(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise TgedgeError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


# -- configs -----------------------------------------------------------------------------------------------
def checkpoint_config(p: Preset, dtype: str = "bf16") -> dict:
    """config.json of the checkpoint, as the TG-LLaVA / LLaVA training code writes it."""
    clip = p.base.clip
    d = {"architectures": [p.architecture], "model_type": p.model_type, **p.base.decoder,
         "mm_vision_tower": clip.name, "mm_hidden_size": clip.vision["hidden_size"], "mm_projector_type": "mlp2x_gelu",
         "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
         "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
         "use_mm_proj": True, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
         "torch_dtype": DTYPES[dtype][2]}
    if p.tg:
        d.update(mm_text_tower=clip.name, mm_text_hidden_size=clip.text["hidden_size"], **p.base.tg_overrides)
    return d


def clip_config(p: Preset, dtype: str = "bf16") -> dict:
    """config.json of the CLIP directory. eos_token_id 2 is what OpenAI's CLIP configs say (pool at the largest id)."""
    c = p.base.clip
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=c.projection_dim,
                  initializer_range=STD, attention_dropout=0.0, dropout=0.0)
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.projection_dim,
            "logit_scale_init_value": 2.6592, "initializer_factor": 1.0, "torch_dtype": DTYPES[dtype][2],
            "text_config": {"model_type": "clip_text_model", **c.text, **common, "bos_token_id": 0,
                            "eos_token_id": 2, "pad_token_id": 1},
            "vision_config": {"model_type": "clip_vision_model", **c.vision, "num_channels": 3, **common}}


def model_config(p: Preset) -> C.ModelConfig:
    """What tgedge reads from the written configs."""
    return original.model_config(checkpoint_config(p), clip_config(p), p.tg, p.tg)


# -- the tensors, named as the reference and CLIPModel save them ----------------------------------------------
def _linear(prefix: str, n_out: int, n_in: int, bias: bool = True, used: bool = True, group: str = "model"):
    yield TensorSpec(group, prefix + "weight", (n_out, n_in), "normal", used=used)
    if bias:
        yield TensorSpec(group, prefix + "bias", (n_out,), "normal", used=used)


def _layer_norm(prefix: str, d: int, bias: bool = True, used: bool = True, group: str = "model"):
    yield TensorSpec(group, prefix + "weight", (d,), "one", used=used)
    if bias:
        yield TensorSpec(group, prefix + "bias", (d,), "normal", used=used)


def _clip_encoder(prefix: str, d: int, hidden: int, layers: int, used: bool):
    for i in range(layers):
        q = f"{prefix}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            yield from _linear(f"{q}self_attn.{proj}.", d, d, used=used, group="clip")
        yield from _layer_norm(q + "layer_norm1.", d, used=used, group="clip")
        yield from _linear(q + "mlp.fc1.", hidden, d, used=used, group="clip")
        yield from _linear(q + "mlp.fc2.", d, hidden, used=used, group="clip")
        yield from _layer_norm(q + "layer_norm2.", d, used=used, group="clip")


def _clip_tensors(cfg: C.ModelConfig, c: ClipSpec, text_used: bool):
    v, t = C.vision_config_from_clip(c.vision, -2, "default"), C.text_config_from_clip(c.text)
    pre = "vision_model."
    yield TensorSpec("clip", pre + "embeddings.class_embedding", (v.hidden_size,), "normal")
    yield TensorSpec("clip", pre + "embeddings.patch_embedding.weight",
                     (v.hidden_size, v.num_channels, v.patch_size, v.patch_size), "normal")
    yield TensorSpec("clip", pre + "embeddings.position_embedding.weight", (v.num_patches + 1, v.hidden_size), "normal")
    yield from _layer_norm(pre + "pre_layrnorm.", v.hidden_size, group="clip")
    yield from _clip_encoder(pre, v.hidden_size, v.intermediate_size, v.num_layers, True)
    yield from _layer_norm(pre + "post_layernorm.", v.hidden_size, group="clip")
    pre = "text_model."
    yield TensorSpec("clip", pre + "embeddings.token_embedding.weight", (t.vocab_size, t.hidden_size), "normal",
                     used=text_used)
    yield TensorSpec("clip", pre + "embeddings.position_embedding.weight", (t.max_position_embeddings, t.hidden_size),
                     "normal", used=text_used)
    yield from _clip_encoder(pre, t.hidden_size, t.intermediate_size, t.num_layers, text_used)
    yield from _layer_norm(pre + "final_layer_norm.", t.hidden_size, used=text_used, group="clip")
    yield from _linear("visual_projection.", c.projection_dim, v.hidden_size, bias=False, used=False, group="clip")
    yield from _linear("text_projection.", c.projection_dim, t.hidden_size, bias=False, used=False, group="clip")
    yield TensorSpec("clip", "logit_scale", (), "const", std=2.6592, used=False)


def _decoder_tensors(d: C.DecoderConfig):
    yield TensorSpec("model", "model.embed_tokens.weight", (d.vocab_size, d.hidden_size), "normal")
    q, kv = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
    for i in range(d.num_layers):
        pre = f"model.layers.{i}."
        yield from _linear(pre + "self_attn.q_proj.", q, d.hidden_size, d.qkv_bias)
        yield from _linear(pre + "self_attn.k_proj.", kv, d.hidden_size, d.qkv_bias)
        yield from _linear(pre + "self_attn.v_proj.", kv, d.hidden_size, d.qkv_bias)
        yield from _linear(pre + "self_attn.o_proj.", d.hidden_size, q, d.o_bias)
        yield from _linear(pre + "mlp.gate_proj.", d.intermediate_size, d.hidden_size, False)
        yield from _linear(pre + "mlp.up_proj.", d.intermediate_size, d.hidden_size, False)
        yield from _linear(pre + "mlp.down_proj.", d.hidden_size, d.intermediate_size, False)
        yield from _layer_norm(pre + "input_layernorm.", d.hidden_size, bias=False)
        yield from _layer_norm(pre + "post_attention_layernorm.", d.hidden_size, bias=False)
    yield from _layer_norm("model.norm.", d.hidden_size, bias=False)
    if not d.tie_word_embeddings:  # a tied head is saved once, as the embedding
        yield from _linear("lm_head.", d.vocab_size, d.hidden_size, False)


def _fom_tensors(f: C.FeatureMaskConfig, c: ClipSpec):
    """TG-FOM as the reference's BertLMHeadModel saves it: the BERT text path and MLM head too (unused)."""
    pre, d, ff = "model.mm_cross_attn.", f.hidden_size, f.intermediate_size
    yield from _linear(pre + "resize_linear.", d, f.text_width)
    yield TensorSpec("model", pre + "zero_layer.weight", (d, d), "normal", std=ZERO_LAYER_STD)
    yield TensorSpec("model", pre + "zero_layer.bias", (d,), "normal", std=ZERO_LAYER_STD)
    yield TensorSpec("model", pre + "query_tokens", (1, f.num_queries, d), "normal")
    bert = pre + "Qformer.bert."
    yield TensorSpec("model", bert + "embeddings.word_embeddings.weight", (c.qformer_vocab, d), "normal", used=False)
    yield TensorSpec("model", bert + "embeddings.position_embeddings.weight", (c.qformer_positions, d), "normal",
                     used=False)
    yield from _layer_norm(bert + "embeddings.LayerNorm.", d)
    yield TensorSpec("model", bert + "embeddings.position_ids", (1, c.qformer_positions), "arange", used=False)
    for i in range(f.num_layers):
        lay = f"{bert}encoder.layer.{i}."
        for att in ("attention.",) + (("crossattention.",) if i % f.cross_attention_freq == 0 else ()):
            for proj in ("query", "key", "value"):
                yield from _linear(f"{lay}{att}self.{proj}.", d, d)
            yield from _linear(f"{lay}{att}output.dense.", d, d)
            yield from _layer_norm(f"{lay}{att}output.LayerNorm.", d)
        for path, used in (("", False), ("_query", True)):  # the text path's FFN is never run for queries
            yield from _linear(f"{lay}intermediate{path}.dense.", ff, d, used=used)
            yield from _linear(f"{lay}output{path}.dense.", d, ff, used=used)
            yield from _layer_norm(f"{lay}output{path}.LayerNorm.", d, used=used)
    cls = pre + "Qformer.cls.predictions."
    yield TensorSpec("model", cls + "bias", (c.qformer_vocab,), "normal", used=False)
    yield from _linear(cls + "transform.dense.", d, d, used=False)
    yield from _layer_norm(cls + "transform.LayerNorm.", d, used=False)


def _dp_tensors(p: C.DetailPerceiverConfig):
    pre, d = "model.mm_patch_encoder.", p.vision_width
    yield TensorSpec("model", pre + "position_embedding.weight", (p.num_positions, d), "normal")
    yield from _linear(pre + "pre_mlp.0.", d, d)
    yield from _linear(pre + "pre_mlp.2.", d, d)
    yield from _linear(pre + "proj.0.", p.llm_width, d)
    yield from _linear(pre + "proj.2.", p.llm_width, p.llm_width)
    yield TensorSpec("model", pre + "perceiver.latents", (p.num_latents, d), "normal")
    q, kv = p.num_heads * p.head_dim, p.num_kv_heads * p.head_dim
    for i in range(p.depth):
        lay = f"{pre}perceiver.layers.{i}."
        yield from _layer_norm(lay + "input_latents_norm.", d, bias=False)
        yield from _layer_norm(lay + "input_context_norm.", d, bias=False)
        for proj, n_out, n_in in (("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)):
            yield from _linear(f"{lay}self_attn.{proj}.", n_out, n_in, False)
        yield from _layer_norm(lay + "post_attention_layernorm.", d, bias=False)
        for proj, n_out, n_in in (("gate_proj", 4 * d, d), ("up_proj", 4 * d, d), ("down_proj", d, 4 * d)):
            yield from _linear(f"{lay}mlp.{proj}.", n_out, n_in, False)
    yield from _layer_norm(pre + "perceiver.norm.", d, bias=False)
    yield from _linear(pre + "resize_linear.", d, p.text_width)


def plan(p: Preset, init: str = "flat", outliers: int = 0, seed: int = 0) -> list[TensorSpec]:
    """Every tensor the two directories hold, in file order, with the values `init` and `outliers` give them
    (presets_init; the defaults are the N(0, 0.02) plan, and the seed matters only for where outliers go)."""
    from tgedge import presets_init

    cfg = model_config(p)
    specs = list(_decoder_tensors(cfg.decoder))
    specs += _linear("model.mm_projector.0.", cfg.projector.out_features, cfg.projector.in_features)
    specs += _linear("model.mm_projector.2.", cfg.projector.out_features, cfg.projector.out_features)
    if cfg.feature_mask is not None:
        specs += _fom_tensors(cfg.feature_mask, p.base.clip)
    if cfg.detail_perceiver is not None:
        specs += _dp_tensors(cfg.detail_perceiver)
    specs += _clip_tensors(cfg, p.base.clip, text_used=p.tg)
    return presets_init.apply(specs, cfg, init, outliers, lambda name: _rng(seed, name))


def summary(p: Preset, dtype: str = "bf16") -> dict:
    """Parameter counts (floating-point tensors) and bytes, from the plan alone."""
    specs = plan(p)
    count = lambda keep: sum(s.numel for s in specs if s.init != "arange" and keep(s))  # noqa: E731
    return {"preset": p.name, "model_type": p.model_type, "decoder": p.base.title,
            "vision": p.base.clip.name, "tg": p.tg,
            "parameters": {"checkpoint": count(lambda s: s.group == "model"),
                           "clip": count(lambda s: s.group == "clip"),
                           "total": count(lambda s: True), "loaded": count(lambda s: s.used)},
            "weight_bytes": sum(s.nbytes(dtype) for s in specs), "dtype": dtype}


# -- synthetic tokenizers of the real vocabulary sizes -------------------------------------------------------
def _template_words(specials) -> list[str]:
    """Every word the prompt templates and a few typical questions contain, so that prompts tokenise to real ids."""
    from tgedge.data.shapes import vocabulary
    from tgedge.prompt import BUILTIN_TEMPLATES, LLAMA3_SYSTEM, QWEN2_SYSTEM, VICUNA_SYSTEM

    turns = [start + user.format("{user}") + opening for start, user, _, opening, _ in BUILTIN_TEMPLATES.values()]
    text = " ".join([VICUNA_SYSTEM, QWEN2_SYSTEM, LLAMA3_SYSTEM, *turns,
                     "What is in the picture? Describe the image in detail. How many objects are there? "
                     "Is there a cat, a dog, a person, a car or a tree? Which one is on the left or right side? "
                     "Yes. No. It is a photo of 0 1 2 3 4 5 6 7 8 9", *vocabulary()])
    for s in [*specials, "{user}"]:
        text = text.replace(s, " ")
    words = [w for w, _ in _pre_tokenizer().pre_tokenize_str(text)]
    return list(dict.fromkeys(["!", *words, *(w.lower() for w in words)]))


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def word_tokenizer(path: Path, size: int, specials: dict, unk: str, bos: str | None, eos: str | None,
                   lowercase: bool = False) -> Path:
    """A WordLevel tokenizer.json with exactly `size` entries: the specials at their ids, template words, fillers."""
    from tokenizers import Tokenizer, models, normalizers, processors

    words = [w for w in _template_words(specials) if w not in specials]
    free = [i for i in range(size) if i not in set(specials.values())]
    vocab = dict(zip(words, free))
    vocab.update((f"tok{i}", i) for i in free[len(vocab):])  # fillers: ids a random model may still emit
    vocab.update(specials)
    if len(vocab) != size:
        raise TgedgeInternalError(f"tokenizer has {len(vocab)} entries, expected {size}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.add_special_tokens(list(specials))
    ends = [t for t in (bos, eos) if t]
    if ends:
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(x for x in (bos, "$A", eos) if x), special_tokens=[(t, specials[t]) for t in ends])
    tok.save(str(path))
    return path


def _tokenizer_files(p: Preset, out: Path, clip_dir: Path) -> None:
    b = p.base
    word_tokenizer(out / "tokenizer.json", b.decoder["vocab_size"], b.specials, b.unk, b.bos, None)
    pad = b.decoder.get("pad_token_id")
    by_id = {i: t for t, i in b.specials.items()}
    _json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": b.bos, "eos_token": b.eos[0], "unk_token": b.unk,
        "pad_token": by_id.get(pad, b.unk), "model_max_length": 2048, "padding_side": "right",
        "add_bos_token": b.bos is not None, "add_eos_token": False})
    gen = {"bos_token_id": b.decoder.get("bos_token_id"), "eos_token_id": [b.specials[t] for t in b.eos]}
    _json(out / "generation_config.json", gen if pad is None else {**gen, "pad_token_id": pad})
    v = b.clip.text["vocab_size"]
    clip_specials = {"<|startoftext|>": v - 2, "<|endoftext|>": v - 1}  # 49406, 49407 as in CLIP's BPE
    word_tokenizer(clip_dir / "tokenizer.json", v, clip_specials, "<|endoftext|>", "<|startoftext|>",
                   "<|endoftext|>", lowercase=True)
    _json(clip_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": b.clip.text[
            "max_position_embeddings"], "do_lower_case": True})


def _image_processor(p: Preset) -> dict:
    """CLIP's image processor settings (written here: tgedge.checkpoint would import torch)."""
    from tgedge.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    side = p.base.clip.vision["image_size"]
    return {"image_processor_type": "CLIPImageProcessor", "feature_extractor_type": "CLIPFeatureExtractor",
            "size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}, "resample": 3,
            "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
            "do_convert_rgb": True}


# -- streaming safetensors ---------------------------------------------------------------------------------
def size_text(n: int) -> str:
    """Bytes for people: 2.10 GB, 1.31 MB, 640 B (decimal units, as the checkpoint's shard sizes)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n} B"


def _rng(seed: int, name: str) -> np.random.Generator:
    words = struct.unpack("<4I", hashlib.sha256(name.encode()).digest()[:16])
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


def _encode(x: np.ndarray, dtype: str) -> bytes:
    if dtype == "bf16":  # float32 -> bfloat16, round to nearest even (values here are finite)
        u = x.view(np.uint32)
        return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype("<u2").tobytes()
    return x.astype("<f2" if dtype == "fp16" else "<f4").tobytes()


def tensor_bytes(s: TensorSpec, dtype: str, seed: int) -> Iterator[bytes]:
    """The tensor's bytes in chunks of at most _CHUNK elements: the whole tensor is never in memory."""
    if s.init == "arange":
        yield np.arange(s.numel, dtype="<i8").reshape(s.shape).tobytes()
        return
    if s.init == "const":
        yield _encode(np.full(s.numel, s.std, np.float32), dtype)
        return
    rng = _rng(seed, s.name)
    last = s.shape[-1] if s.shape else 1
    chunk = _CHUNK if not s.row_spread else max(1, _CHUNK // last) * last  # whole rows, to scale them
    rows = _row_factors(seed, s) if s.row_spread else None
    for start in range(0, s.numel, chunk):
        x = rng.standard_normal(min(chunk, s.numel - start), dtype=np.float32)
        x *= s.std
        if s.init == "one":
            x += 1.0
        if rows is not None:
            x.reshape(-1, last)[...] *= rows[start // last:start // last + len(x) // last, None]
        for c in s.channels:  # the positions of channel c in this chunk, a strided view: no index array
            x[(c - start) % last::last] *= np.float32(s.channel_scale)
        if s.signs:
            x *= np.where(_rng(seed, s.name + "#signs").random(s.numel)[start:start + len(x)] < 0.5, -1, 1).astype(
                np.float32)
        yield _encode(x, dtype)


def _row_factors(seed: int, s: TensorSpec) -> np.ndarray:
    """exp(sigma z - sigma^2) for each row: log-normal row norms with mean square 1 (a heavy-tailed vocabulary)."""
    z = _rng(seed, s.name + "#rows").standard_normal(s.shape[0], dtype=np.float32)
    return np.exp(s.row_spread * z - np.float32(s.row_spread ** 2)).astype(np.float32)


def write_safetensors(path: Path, specs: list[TensorSpec], dtype: str, seed: int,
                      progress: Callable[[TensorSpec], None] | None = None) -> int:
    """Header first (every offset follows from the shapes), then each tensor's bytes as it is generated."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for s in specs:
        n = s.nbytes(dtype)
        header[s.name] = {"dtype": "I64" if s.init == "arange" else DTYPES[dtype][0], "shape": list(s.shape),
                          "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for s in specs:
            for chunk in tensor_bytes(s, dtype, seed):
                f.write(chunk)
            if progress:
                progress(s)
    return 8 + len(blob) + offset


def _write_group(directory: Path, specs: list[TensorSpec], dtype: str, seed: int, shard_bytes: int,
                 progress) -> None:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes(dtype) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes(dtype)
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", specs, dtype, seed, progress)
        return
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard, dtype, seed, progress)
    _json(directory / "model.safetensors.index.json",
          {"metadata": {"total_size": sum(s.nbytes(dtype) for s in specs)},
           "weight_map": {s.name: name for name, shard in zip(names, shards) for s in shard}})


def _json(path: Path, d: dict) -> None:
    path.write_text(json.dumps(d, indent=2) + "\n")


# -- the command ---------------------------------------------------------------------------------------------
def check_output_dir(out: Path) -> None:
    """Stricter than fileio's rule for -o: a non-empty directory must be an earlier output of this command."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise TgedgeError(f"{out}: not empty and not written by `tgedge checkpoint random` (no {MARKER}): "
                          "pick another -o, or pass --force to replace it")


def write_random(name: str, out: str | Path, seed: int = 0, dtype: str = "bf16",
                 shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Callable[[TensorSpec], None] | None = None,
                 force: bool = False, init: str = "flat", outliers: int | None = None) -> dict:
    """Write preset `name` to `out` (checkpoint) and `out/clip` (CLIPModel dir); -> the summary written to MARKER.

    `init`: `flat` (N(0, 0.02)) or `realistic` (presets_init); `outliers`: channels per tower, None for the init's
    default (4 with `realistic`, none with `flat`). `force` replaces a non-empty `out` that this command did not
    write (fileio.atomic_dir's rules otherwise)."""
    from tgedge import presets_init
    from tgedge.fileio import atomic_dir, check_output

    p, out = get(name), Path(out)
    if dtype not in DTYPES:
        raise TgedgeError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if not isinstance(seed, int) or seed < 0:
        raise TgedgeError(f"seed must be a non-negative integer (got {seed!r})")
    if shard_bytes < 1:
        raise TgedgeError(f"shard size must be positive (got {shard_bytes})")
    outliers = presets_init.default_outliers(init) if outliers is None else outliers
    specs = plan(p, init, outliers, seed)  # checks init and outliers
    # resolved first (symlinks, `..`): `-o link/clip/..` must not create clip/ inside what the link points to
    target = check_output(out, "checkpoint", force=force)
    if not force:
        check_output_dir(target)
    info = summary(p, dtype)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, out) from None
    margin = 64 << 20  # config, tokenizers, the CLIP directory's files
    need, free = info["weight_bytes"] + margin, shutil.disk_usage(target.parent).free
    if need > free:
        raise TgedgeError(f"{target.parent}: {p.name} needs {size_text(info['weight_bytes'])} of weights and "
                          f"{size_text(margin)} for its other files, {size_text(free)} free")
    with atomic_dir(out, kind="checkpoint", force=force) as tmp:
        clip = tmp / CLIP_SUBDIR
        clip.mkdir()
        _json(tmp / "config.json", checkpoint_config(p, dtype))
        _json(clip / "config.json", clip_config(p, dtype))
        _json(clip / "preprocessor_config.json", _image_processor(p))
        _tokenizer_files(p, tmp, clip)
        for group, directory in (("model", tmp), ("clip", clip)):
            _write_group(directory, [s for s in specs if s.group == group], dtype, seed, shard_bytes, progress)
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        info.update(seed=seed, init=init, outliers=outliers, outlier_channels=presets_init.planted(specs), files=files,
                    bytes=sum(files.values()),
                    note="random weights: for memory, time and shape tests only; the answers are noise")
        _json(tmp / MARKER, info)
    return info
