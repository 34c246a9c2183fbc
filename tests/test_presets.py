"""`tgedge checkpoint random`: real-size plans against tgedge's model, the tiny preset written, loaded and run."""

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tgedge import checkpoint as K
from tgedge import cli_checkpoint, presets
from tgedge.cli_common import Parser
from tgedge.checkpoint import load_model
from tgedge.demo import shapes_image
from tgedge.errors import TgedgeError
from tgedge.layouts import original, rename
from tgedge.model import TGLlava
from tgedge.preprocess import Tokenizer
from tgedge.reference import TorchPipeline

REAL = [n for n in presets.PRESETS if "tiny" not in n]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tg-tiny with small shards, so that the index path is exercised too."""
    out = tmp_path_factory.mktemp("presets") / "tg-tiny"
    info = presets.write_random("tg-tiny", out, seed=0, shard_bytes=200_000)
    return out, info


def _loaded_names(p: presets.Preset) -> tuple[dict, list]:
    """The plan renamed as checkpoint.py renames on load: {tgedge name: shape} of used tensors, and the rest."""
    used, unused = {}, []
    for s in presets.plan(p):
        name = rename([s.name], original.PREFIXES if s.group == "model" else original.CLIP_PREFIXES)[s.name]
        (unused.append(name) if not s.used else used.__setitem__(name, s.shape))
    return used, unused


@pytest.mark.parametrize("name", list(presets.PRESETS))
def test_plan_matches_the_model_built_from_the_written_configs(name):
    p = presets.get(name)
    cfg = original.model_config(presets.checkpoint_config(p), presets.clip_config(p), p.tg, p.tg)
    with torch.device("meta"):
        model = TGLlava(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    used, unused = _loaded_names(p)
    assert used == expected
    for n in unused:  # what the reference or CLIPModel saves and tgedge skips
        assert K.IGNORED.fullmatch(n) or (not p.tg and n.startswith("text_tower.")), n
    assert presets.summary(p)["parameters"]["loaded"] == sum(v.numel() for v in model.parameters())
    assert cfg.has_tg == p.tg and cfg.decoder.family == p.base.family


def test_real_sizes_are_the_public_models():
    def count(name, keep):
        return sum(s.numel for s in presets.plan(presets.get(name)) if keep(s))

    def decoder(s):
        return s.name.startswith(("model.embed_tokens", "model.layers.", "model.norm", "lm_head"))

    assert count("tg-qwen2-0.5b", decoder) == 494_032_768  # Qwen2-0.5B
    assert count("llava-qwen2-1.5b", decoder) == 1_543_714_304  # Qwen2-1.5B
    assert count("tg-vicuna-7b", decoder) == 6_738_415_616  # LLaMA-2-7B / Vicuna-7B v1.5
    assert count("tg-qwen2-0.5b", lambda s: s.group == "clip") == 427_944_193  # CLIP ViT-L/14-336
    cfg = presets.model_config(presets.get("tg-qwen2-0.5b"))
    assert cfg.vision.num_patches == cfg.feature_mask.num_queries == 576 and cfg.detail_perceiver.num_positions == 2304
    assert cfg.text_guide.hidden_size == 768 and cfg.decoder.tie_word_embeddings
    assert not presets.model_config(presets.get("tg-vicuna-7b")).decoder.tie_word_embeddings
    assert 1.04e9 < presets.summary(presets.get("tg-qwen2-0.5b"))["parameters"]["total"] < 1.05e9


def test_tiny_loads_and_answers(tiny, tmp_path):
    out, info = tiny
    model, ckpt = load_model(out, out / presets.CLIP_SUBDIR)
    cfg = ckpt.config
    assert cfg.model_type == "llava_qwen_text_learnable_query" and cfg.feature_mask and cfg.detail_perceiver
    assert ckpt.preprocessor.spec.template.name == "qwen_2" and cfg.pad_to_square
    assert model.mm_cross_attn.zero_layer.weight.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]["loaded"]
    image = shapes_image(tmp_path / "image.png")
    pipe = TorchPipeline(model, ckpt.preprocessor)
    answer = pipe.answer(image, "What color is the circle?", pipe.options(max_new_tokens=4))
    assert answer.tokens and answer.prompt_tokens > cfg.num_image_tokens
    assert all(np.isfinite(p.detach().numpy()).all() for p in model.parameters())


def test_plain_twin_loads_as_plain_llava(tmp_path):
    out = tmp_path / "llava-tiny"
    presets.write_random("llava-tiny", out)
    model, ckpt = load_model(out, out / "clip")
    assert not ckpt.config.has_tg and ckpt.config.model_type == "llava_qwen2" and model.text_tower is None
    pipe = TorchPipeline(model, ckpt.preprocessor)
    assert pipe.answer(shapes_image(tmp_path / "i.png"), "What is it?", pipe.options(max_new_tokens=4)).tokens


def test_files_read_back_with_safetensors(tiny):
    out, info = tiny
    specs = {(s.group, s.name): s for s in presets.plan(presets.get("tg-tiny"))}
    seen = set()
    for group, directory in (("model", out), ("clip", out / "clip")):
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # sharded
        for file in sorted(set(index["weight_map"].values())):
            with safe_open(str(directory / file), "pt") as f:
                for name in f.keys():
                    t, s = f.get_tensor(name), specs[group, name]
                    assert tuple(t.shape) == s.shape and index["weight_map"][name] == file
                    assert t.dtype == (torch.int64 if s.init == "arange" else torch.bfloat16)
                    seen.add((group, name))
                    if s.init == "one":
                        assert (t.float() - 1).abs().max() < 0.15
                    if s.init == "normal" and t.numel() > 4000:
                        assert abs(t.float().std().item() - s.std) < 0.1 * s.std
    assert seen == set(specs)
    pos = "model.mm_cross_attn.Qformer.bert.embeddings.position_ids"
    with safe_open(str(out / json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][pos]),
                   "pt") as f:
        assert torch.equal(f.get_tensor(pos)[0], torch.arange(presets.CLIP_TINY.qformer_positions))
    marker = json.loads((out / presets.MARKER).read_text())
    assert marker["preset"] == "tg-tiny" and "random weights" in marker["note"] and marker["files"] == info["files"]
    assert sum(size for name, size in info["files"].items() if name.endswith(".safetensors")) > info["weight_bytes"]


def test_same_seed_same_bytes(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    presets.write_random("tg-tiny", again, seed=0, shard_bytes=200_000)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    other = tmp_path / "seed1"
    presets.write_random("tg-tiny", other, seed=1, shard_bytes=200_000)
    assert (other / "config.json").read_bytes() == (out / "config.json").read_bytes()
    first = sorted(out.glob("model-*.safetensors"))[0].name
    assert (other / first).read_bytes() != (out / first).read_bytes()


def test_tokenizers_have_the_real_vocabulary_sizes(tmp_path):
    b = presets.get("tg-qwen2-0.5b").base
    path = presets.word_tokenizer(tmp_path / "qwen.json", 151936, b.specials, b.unk, b.bos, None)
    tok = Tokenizer(path)
    assert tok.vocab_size == 151936 and tok.token_to_id("<|im_end|>") == 151645
    ids = tok.encode("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant.")
    assert ids[0] == 151644 and b.specials[b.unk] not in ids  # every template word is in the vocabulary
    clip = Tokenizer(presets.word_tokenizer(tmp_path / "clip.json", 49408, {"<|startoftext|>": 49406,
                                                                            "<|endoftext|>": 49407},
                                            "<|endoftext|>", "<|startoftext|>", "<|endoftext|>", lowercase=True))
    ids = clip.encode("What is in the Picture?")
    assert clip.vocab_size == 49408 and clip.token_to_id("!") == 0
    assert ids[0] == 49406 and ids[-1] == 49407 and 49407 not in ids[1:-1]
    v = presets.get("llava-vicuna-7b").base
    llama = Tokenizer(presets.word_tokenizer(tmp_path / "llama.json", 32000, v.specials, v.unk, v.bos, None))
    assert llama.vocab_size == 32000 and llama.encode("USER: hello")[0] == 1


def test_output_refusals(tiny, tmp_path):
    with pytest.raises(TgedgeError, match="unknown preset 'tg-13b' .*known: tg-qwen2-0.5b"):
        presets.write_random("tg-13b", tmp_path / "x")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(TgedgeError, match="not a tgedge output.*--force"):
        presets.write_random("tg-tiny", foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(TgedgeError, match="not a directory"):
        presets.write_random("tg-tiny", tmp_path / "file")
    trained = tmp_path / "trained"  # another tgedge checkpoint output: the same kind, but not this command's
    presets.write_random("llava-tiny", trained)
    (trained / presets.MARKER).unlink()
    with pytest.raises(TgedgeError, match="not written by `tgedge checkpoint random`"):
        presets.write_random("tg-tiny", trained)
    with pytest.raises(TgedgeError, match="seed must be a non-negative"):
        presets.write_random("tg-tiny", tmp_path / "y", seed=-1)
    with pytest.raises(TgedgeError, match="unknown dtype"):
        presets.write_random("tg-tiny", tmp_path / "y", dtype="int8")
    presets.write_random("tg-tiny", foreign, force=True)
    assert not (foreign / "notes.txt").exists() and (foreign / presets.MARKER).exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    presets.write_random("llava-tiny", empty)  # an empty folder is fine; an earlier output is replaced
    presets.write_random("tg-tiny", empty, seed=3)
    assert json.loads((empty / presets.MARKER).read_text())["preset"] == "tg-tiny"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def _cli(*argv):
    parser = Parser(prog="tgedge")
    cli_checkpoint.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli(tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert _cli("checkpoint", "random", "--preset", "llava-tiny", "-o", str(out), "--seed", "2", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clip"] == str(out / "clip") and f"--clip {out / 'clip'}" in result["run"]
    assert result["seed"] == 2 and result["parameters"]["total"] == presets.summary(presets.get("llava-tiny"))[
        "parameters"]["total"]
    assert _cli("checkpoint", "random", "--preset", "tg-tiny", "-o", str(out), "--max-shard-size", "300KB") == 0
    text = capsys.readouterr().out
    assert "random weights" in text and f"tgedge run {out} --clip {out / 'clip'}" in text
    assert (out / "model.safetensors.index.json").exists()
    assert _cli("checkpoint", "presets", "--json") == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(presets.PRESETS) and rows["tg-vicuna-7b"]["weight_bytes"] > 14e9
    with pytest.raises(TgedgeError, match="unknown preset 'big'"):
        _cli("checkpoint", "random", "--preset", "big", "-o", str(tmp_path / "z"))
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "keep.txt").write_text("")
    with pytest.raises(TgedgeError, match="--force"):
        _cli("checkpoint", "random", "--preset", "tg-tiny", "-o", str(tmp_path / "z"))
    assert _cli("checkpoint", "random", "--preset", "tg-tiny", "-o", str(tmp_path / "z"), "--force", "--json") == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):  # options are checked when parsed, before any work
        _cli("checkpoint", "random", "--preset", "tg-tiny", "-o", str(tmp_path / "w"), "--seed", "-1")
    with pytest.raises(SystemExit):
        _cli("checkpoint", "random", "--preset", "tg-tiny", "-o", str(tmp_path / "w"), "--max-shard-size", "lots")
    with pytest.raises(SystemExit):
        _cli("checkpoint", "random", "--preset", "tg-tiny")
    assert not (tmp_path / "w").exists()
    with pytest.raises(SystemExit):
        _cli("checkpoint", "random", "--help")
    assert "random weights" in capsys.readouterr().out


def test_parse_size():
    assert cli_checkpoint.parse_size("5GB") == 5 * 10**9
    assert cli_checkpoint.parse_size("1.5 gb") == 1_500_000_000
    assert cli_checkpoint.parse_size("2GiB") == 2 * 2**30
    assert cli_checkpoint.parse_size("4096") == 4096
    for bad in ("lots", "0GB", "-1MB", "5 TB"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a size"):
            cli_checkpoint.parse_size(bad)


# -- inits and planted outliers (presets_init), and `checkpoint stats` (model_stats) --------------------------------
@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    out = tmp_path_factory.mktemp("realistic") / "tg-tiny"
    return out, presets.write_random("tg-tiny", out, init="realistic")


def _tensors(directory):
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}


def test_flat_plan_is_unchanged_and_outliers_need_asking():
    p = presets.get("tg-tiny")
    flat = presets.plan(p)
    assert presets.plan(p, "flat", 0, seed=5) == flat
    assert all(s.std in (presets.STD, presets.ZERO_LAYER_STD, 2.6592) and not s.channels and not s.row_spread
               for s in flat)
    from tgedge.presets_init import default_outliers
    assert default_outliers("flat") == 0 and default_outliers("realistic") > 0
    with pytest.raises(TgedgeError, match=r"--init \| got 'trained'"):
        presets.plan(p, "trained")
    with pytest.raises(TgedgeError, match=r"--outliers \| got 40 \| expected at most"):
        presets.plan(p, "realistic", 40)


def test_flat_files_are_the_same_as_before_and_realistic_differs(tiny, realistic, tmp_path):
    """`--init flat` draws exactly as earlier versions did (the tiny fixture's files: same seed, same bytes)."""
    out, _ = tiny
    flat = tmp_path / "flat"
    presets.write_random("tg-tiny", flat, shard_bytes=200_000, init="flat", outliers=0)
    for f in sorted(p.relative_to(out) for p in out.rglob("*.safetensors")):
        assert (out / f).read_bytes() == (flat / f).read_bytes(), f
    real, info = realistic
    assert info["init"] == "realistic" and info["outliers"] == 4 and set(info["outlier_channels"]) == {"decoder",
                                                                                                      "vision"}
    assert (real / "config.json").read_bytes() == (out / "config.json").read_bytes()
    again = tmp_path / "again"
    presets.write_random("tg-tiny", again, init="realistic")  # deterministic per seed
    for f in ("model.safetensors", "clip/model.safetensors"):
        assert (real / f).read_bytes() == (again / f).read_bytes()


def test_outliers_are_in_the_written_tensors(realistic):
    """Norm gains OUTLIER_GAIN x on the planted channels, the next Linear's columns scaled down to match."""
    from tgedge.presets_init import OUTLIER_GAIN

    out, info = realistic
    model, clip = _tensors(out), _tensors(out / "clip")
    ch = list(info["outlier_channels"]["decoder"])
    rest = [i for i in range(64) if i not in ch]
    for i in range(2):
        g = model[f"model.layers.{i}.input_layernorm.weight"]
        assert (g[ch] > 0.8 * OUTLIER_GAIN).all() and (g[rest] - 1).abs().max() < 0.15
        w = model[f"model.layers.{i}.mlp.gate_proj.weight"]
        assert w[:, ch].abs().mean() < 2 * w[:, rest].abs().mean() / OUTLIER_GAIN
        assert w[:, rest].std().item() == pytest.approx(64 ** -0.5, rel=0.1)  # variance-preserving
    vch = list(info["outlier_channels"]["vision"])
    g = clip["vision_model.encoder.layers.0.layer_norm1.weight"]
    assert (g[vch] > 0.8 * OUTLIER_GAIN).all()
    final = model["model.norm.weight"]  # the tied head's norm: no outliers; random signs
    assert (final.abs() - 1).abs().max() < 0.15 and 0 < (final < 0).sum() < 64
    embed = model["model.embed_tokens.weight"]
    assert embed.std().item() == pytest.approx(3.0 / 8, rel=0.1)  # logit std ~3 over a 64-wide hidden state
    down = model["model.layers.1.mlp.down_proj.weight"]  # writes as much as an embedding: std 3/8 from unit inputs
    assert down.std().item() * down.shape[1] ** 0.5 == pytest.approx(3.0 / 8, rel=0.1)
    assert embed.norm(dim=1).std() > 0.2 * embed.norm(dim=1).mean()  # log-normal row norms


def test_outliers_preserve_the_function_and_show_in_the_activations(tmp_path, realistic):
    """The same realistic weights with and without outliers answer the same (up to bf16 rounding): the channels
    move between the norm and the next Linear; the stats see them in the normalised activations."""
    from tgedge.model_stats import checkpoint_stats

    out, info = realistic
    plain = tmp_path / "plain"
    presets.write_random("tg-tiny", plain, init="realistic", outliers=0)
    image = shapes_image(tmp_path / "i.png")
    with_o = checkpoint_stats(out, out / "clip", image, tokens=4)
    without = checkpoint_stats(plain, plain / "clip", image, tokens=4)
    assert with_o["decoder"]["outlier_ratio"] > 20 and without["decoder"]["outlier_ratio"] < 5
    assert with_o["vision"]["outlier_ratio"] > 20 and without["vision"]["outlier_ratio"] < 5
    assert with_o["decoder"]["outlier_channels"] == info["outlier_channels"]["decoder"]
    assert with_o["vision"]["outlier_channels"] == info["outlier_channels"]["vision"]
    assert with_o["logits"]["last_std"] == pytest.approx(without["logits"]["last_std"], rel=0.05)
    assert with_o["generated"][:2] == without["generated"][:2]


def test_stats_on_presets_and_the_demo(tmp_path, capsys, tiny, realistic):
    out, _ = tiny
    real, _ = realistic
    assert _cli("checkpoint", "stats", str(out), "--max-new-tokens", "3", "--json") == 0  # CKPT/clip by default
    flat = json.loads(capsys.readouterr().out)
    assert flat["top1"]["positions"] == 3 and len(flat["generated"]) == 3
    assert flat["decoder"]["layers"] == 2 and len(flat["decoder"]["residual_std"]) == 2
    assert set(flat["stages"]) == {"vision", "text_guide", "fusion", "embed"}
    assert flat["logits"]["last_std"] < 0.5 and flat["top1"]["p50"] < 0.05  # near-flat: the old presets
    assert _cli("checkpoint", "stats", str(real), "--max-new-tokens", "3", "--json") == 0
    sharp = json.loads(capsys.readouterr().out)
    assert 2 < sharp["logits"]["last_std"] < 4 and sharp["top1"]["p50"] > 0.3
    assert sharp["decoder"]["residual_std"][-1] > sharp["decoder"]["residual_std"][0]
    assert _cli("checkpoint", "stats", "demo", "--max-new-tokens", "2", "--prompt", "What color is the circle?") == 0
    text = capsys.readouterr().out
    assert "outlier ratio" in text and "top-1 probability" in text and "decoder" in text
    with pytest.raises(SystemExit):
        _cli("checkpoint", "random", "--preset", "tg-tiny", "-o", str(tmp_path / "w"), "--outliers", "some")
    assert _cli("checkpoint", "random", "--preset", "tg-tiny", "-o", str(tmp_path / "n"), "--init", "flat",
                "--outliers", "none", "--json") == 0
    written = json.loads(capsys.readouterr().out)
    assert written["init"] == "flat" and written["outliers"] == 0 and written["outlier_channels"] == {}


def test_w8_sensitivity_keeps_a_smooth_init_and_catches_weights_8_bits_cannot_hold(tmp_path, realistic):
    """`checkpoint stats --sensitivity`: the realistic init keeps its argmaxes under 8-bit rounding of the decoder's
    weights, and the weights come back bit for bit; a decoder with a dead input channel (norm weight 0) whose weight
    column is 1000x the rest computes the same function, but 8 bits per row round the rest to zero: reported."""
    from tgedge.model_stats import w8_sensitivity

    out, _ = realistic
    model, ckpt = load_model(out, out / "clip")
    pipe = TorchPipeline(model, ckpt.preprocessor)
    x = pipe.embeddings(pipe.pre(shapes_image(tmp_path / "i.png"), "What is in the picture?"))
    gen = torch.Generator().manual_seed(0)
    tokens = [int(t) for t in torch.randint(4, model.cfg.decoder.vocab_size, (6,), generator=gen)]
    before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    smooth = w8_sensitivity(model, pipe, x, tokens)
    assert all(torch.equal(v, before[k]) for k, v in model.language_model.state_dict().items())
    assert smooth["positions"] == 6 and smooth["top1"] == 1.0 and smooth["min_cosine"] > 0.98
    with torch.no_grad():
        for layer in model.language_model.layers:
            layer.input_layernorm.weight[0] = 0
            layer.post_attention_layernorm.weight[0] = 0
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                      layer.mlp.up_proj):
                m.weight[:, 0] = 1000 * m.weight.abs().amax(1)
    spiky = w8_sensitivity(model, pipe, x, tokens)
    assert spiky["top1"] < 0.5 and spiky["min_cosine"] < 0.9


def test_a_random_checkpoint_finds_its_clip_directory(tiny):
    """`checkpoint random` writes CKPT/clip beside its marker: load, export and validate need no --clip for it; a
    directory without the marker still asks for one."""
    out, _ = tiny
    model, ckpt = load_model(out)
    assert model.cfg.vision.hidden_size > 0
    (out / presets.MARKER).rename(out / "moved.json")
    try:
        with pytest.raises(TgedgeError, match="pass --clip DIR"):
            load_model(out)
    finally:
        (out / "moved.json").rename(out / presets.MARKER)


def test_path_shape_flags_a_path_of_one_token():
    """A greedy path that repeats one token is one attractor: `checkpoint stats` says so (the 0.5 B realistic
    preset's did, 1 distinct of 16); a varied path is not flagged."""
    from tgedge.model_stats import format_stats, path_shape

    assert path_shape([7] * 16) == {"tokens": 16, "distinct": 1, "longest_repeat": 16}
    assert path_shape([1, 2, 2, 3, 2, 2, 2]) == {"tokens": 7, "distinct": 3, "longest_repeat": 3}
    stats = {"checkpoint": "c", "prompt_tokens": 5, "image": "i", "prompt": "p", "stages": {}, "vision": {"layers": 0},
             "decoder": {"layers": 0}, "logits": {"last_std": 1.0, "last_max": 2.0, "std_mean": 1.0},
             "top1": {"positions": 16, "p10": 0.5, "p50": 0.6, "p90": 0.7}}
    assert "degenerate" in format_stats({**stats, "greedy": path_shape([7] * 16)})
    assert "degenerate" not in format_stats({**stats, "greedy": path_shape(list(range(16)))})
