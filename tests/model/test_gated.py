"""The gated fusion family: config and checkpoints, the model's properties, export, runtime, validate, quantize,
TensorRT for RTX build, train-demo, and the `demo-gated` word before a trained model ships."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import tiny
from tgedge import config as C
from tgedge.checkpoint import load_model, save_checkpoint
from tgedge.cli import main
from tgedge.contract import FAMILIES, StageContract, family_of
from tgedge.data import shapes
from tgedge.data.folder import read_folder, write_folder
from tgedge.errors import TgedgeError
from tgedge.export.onnx_export import export_model
from tgedge.model import TGLlava
from tgedge.model.fusion_gated import GatedFusion
from tgedge.preprocess import Preprocessor, Tokenizer
from tgedge.reference import TorchPipeline
from tgedge.runtime.pipeline import Pipeline
from tgedge.train_demo import build_demo_model, randomize_gated_fusion, random_gated_checkpoint
from tgedge.validate import validate

STRATEGIES = list(C.GATED_STRATEGIES)
QUESTION = "what color is the circle?"


def gated_twin(root, family: str, strategy: str = "adaptive_gating", seed: int = 3):
    """A random transformers LLaVA (tiny LLaMA or Qwen2) with a CLIP text tower and gated fusion added, in tgedge's
    layout; returns (gated checkpoint, the plain LLaVA it was made from)."""
    src = root / "plain"
    src.mkdir(parents=True)
    tiny.hf_llava(src, family)
    plain, ckpt = load_model(src)
    guide = Tokenizer(tiny.clip_tokenizer(root / "clip" / "tokenizer.json"))
    text = C.TextGuideConfig(vocab_size=guide.vocab_size, hidden_size=24, intermediate_size=48, num_layers=2,
                             num_heads=4, max_position_embeddings=16, eos_token_id=guide.token_to_id("<|endoftext|>"))
    gated = C.GatedFusionConfig(vision_width=plain.cfg.vision.hidden_size, text_width=24, num_layers=2, num_heads=4,
                                strategy=strategy)
    torch.manual_seed(seed)
    model = TGLlava(dataclasses.replace(plain.cfg, layout=C.TGEDGE_LAYOUT, text_guide=text, gated_fusion=gated))
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("text_tower.", "mm_gated_fusion.")) for k in missing)
    randomize_gated_fusion(model)
    pre = Preprocessor(dataclasses.replace(ckpt.preprocessor.spec, text_guide_length=16), ckpt.preprocessor.tokenizer,
                       guide)
    return save_checkpoint(model, pre, root / "gated"), src


def _last_logits(model, pre, image, question=QUESTION):
    pipe = TorchPipeline(model, pre)
    x = pipe.embeddings(pre(image, question))
    with torch.no_grad():
        return model(x, torch.arange(x.shape[1]))[0, -1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gated")


@pytest.fixture(scope="module")
def demo_gated(root):
    """Random gated checkpoints of the demo architecture, one per strategy."""
    return {s: random_gated_checkpoint(root / f"demo-{s}", seed=1, strategy=s) for s in STRATEGIES}


@pytest.fixture(scope="module")
def samples(root):
    return write_folder(shapes.generate(shapes.SPLIT_SEEDS["eval"], 12), root / "eval")


@pytest.fixture(scope="module")
def demo_export(demo_gated, root):
    result = export_model(demo_gated["adaptive_gating"], root / "export")
    assert result.passed, [c.to_dict() for c in result.checks if not c.passed]
    return result


# -- config and checkpoints ---------------------------------------------------------------------------------------
def test_config_and_contract(demo_gated):
    for strategy, path in demo_gated.items():
        raw = json.loads((path / "config.json").read_text())
        assert raw["tg"]["tg_fusion"] == {"family": "gated", "layers": 2, "heads": 4, "strategy": strategy,
                                          "intermediate_size": 384, "layer_norm_eps": 1e-5}
        assert raw["tg"]["feature_mask"] is False and raw["tg"]["detail_perceiver"] is False
        model, ckpt = load_model(path)
        cfg = model.cfg
        assert cfg.has_tg and cfg.gated_fusion.strategy == strategy and cfg.num_image_tokens == 64
        assert cfg.feature_mask is None and cfg.detail_perceiver is None and model.text_tower is not None
        assert family_of(cfg.to_dict()) is FAMILIES["gated"] and list(FAMILIES)[-1] == "plain"
        c = StageContract.from_config(cfg.to_dict(), 256)
        assert c.stage_names == ("text_guide", "vision", "fusion", "embed", "decoder")
        assert c.stages["fusion"].input_names == ["image_features", "text_features"]
        assert c.stages["fusion"].outputs[0].shape == ("batch_size", 64, 128) and c.dims["num_views"]["opt"] == 1
        spec = ckpt.preprocessor.spec
        assert not spec.detail_crops and spec.text_guide_length == 32 and spec.num_image_tokens == 64
        assert all(k.startswith("mm_gated_fusion.") for k in ckpt.weights if "gated" in k)


def test_save_load_round_trip_identical_logits(demo_gated, tmp_path):
    model, ckpt = load_model(demo_gated["attention_weights"])
    out = save_checkpoint(model, ckpt.preprocessor, tmp_path / "again")
    model2, ckpt2 = load_model(out)
    image = tiny.test_image(tmp_path / "i.png")
    assert json.loads((out / "config.json").read_text()) == json.loads((ckpt.path / "config.json").read_text())
    assert torch.equal(_last_logits(model, ckpt.preprocessor, image), _last_logits(model2, ckpt2.preprocessor, image))


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.update(strategy="mean"), r"tg.tg_fusion.strategy 'mean' is unknown \(choose from adaptive_gating, "
                                          r"attention_weights\)"),
    (lambda f: f.update(family="tg"), r"tg.tg_fusion.family 'tg' is not one tg_fusion configures"),
    (lambda f: f.pop("family"), r"tg.tg_fusion.family is missing"),
    (lambda f: f.update(layer=3), r"tg.tg_fusion has unknown key\(s\) 'layer'"),
    (lambda f: f.update(heads=5), r"tg.tg_fusion.heads 5 does not divide the vision hidden_size 96"),
    (lambda f: f.update(layers=0, layer_norm_eps=float("nan")),
     r"tg.tg_fusion.layers must be an integer >= 1 \(got 0\); tg.tg_fusion.layer_norm_eps must be a finite"),
])
def test_config_schema_errors_are_one_line(demo_gated, tmp_path, edit, match):
    ckpt = tmp_path / "ckpt"
    import shutil

    shutil.copytree(demo_gated["adaptive_gating"], ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    edit(raw["tg"]["tg_fusion"])
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(TgedgeError, match=match) as e:
        load_model(ckpt)
    assert "\n" not in str(e.value)


def test_gated_beside_tg_modules_is_refused(demo_gated, tmp_path):
    import shutil

    shutil.copytree(demo_gated["adaptive_gating"], tmp_path / "c")
    raw = json.loads((tmp_path / "c" / "config.json").read_text())
    raw["tg"]["feature_mask"] = True
    (tmp_path / "c" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(TgedgeError, match="tg.feature_mask is true beside tg.tg_fusion"):
        load_model(tmp_path / "c")
    with pytest.raises(TgedgeError, match="unknown gated fusion strategy 'sum'"):
        C.GatedFusionConfig(vision_width=32, text_width=24, strategy="sum")


# -- the model -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_untrained_gated_fusion_is_exactly_plain_llava(strategy, tmp_path):
    """Zero-initialised residual branches give h_text = h_image, and a neutral gate mixes two equal halves."""
    torch.manual_seed(0)
    model, _ = build_demo_model(tmp_path, "gated", strategy)
    image, text = torch.randn(2, 64, 96), torch.randn(2, 7, 64)
    with torch.no_grad():
        assert torch.equal(model.mm_gated_fusion(image, text), image)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_text_mask_gives_the_unpadded_batch_one_numbers(strategy, demo_gated):
    """Training pads the text guide and masks it; inference runs each question unpadded: the same numbers."""
    model, ckpt = load_model(demo_gated[strategy])
    pre = ckpt.preprocessor
    ids = [pre.guide_ids(q)[0] for q in ("what color is the circle?", "is there a small red square at the top left?")]
    padded = torch.zeros(2, max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        padded[i, :len(row)] = torch.from_numpy(row)
    image = torch.randn(2, 64, 96)
    with torch.no_grad():
        text, _ = model.text_guide(padded)
        batch = GatedFusion.fuse(model, image, text, text_mask=padded != 0)
        unmasked = GatedFusion.fuse(model, image, text)
        for i, row in enumerate(ids):
            alone = model.fuse(image[i:i + 1], text_features=model.text_guide(torch.from_numpy(row)[None])[0])
            torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-6, rtol=1e-6)
    assert (batch[0] - unmasked[0]).abs().max() > 1e-4  # the shorter question's padding mattered


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_gate_zero_is_plain_llava_with_the_same_weights(family, strategy, tmp_path):
    gated_dir, plain_dir = gated_twin(tmp_path, family, strategy)
    gated, ckpt = load_model(gated_dir)
    plain, plain_ckpt = load_model(plain_dir)
    image = tiny.test_image(tmp_path / "i.png", size=(30, 44))
    want = _last_logits(plain, plain_ckpt.preprocessor, image)
    assert not torch.equal(_last_logits(gated, ckpt.preprocessor, image), want)
    GatedFusion.ablate(gated, "gate")
    assert torch.equal(_last_logits(gated, ckpt.preprocessor, image), want)
    with pytest.raises(TgedgeError, match="unknown gated fusion ablation 'fom'"):
        GatedFusion.ablate(gated, "fom")


def test_text_ablation_removes_the_question(demo_gated, tmp_path):
    model, ckpt = load_model(demo_gated["adaptive_gating"])
    pipe = TorchPipeline(model, ckpt.preprocessor)
    image = tiny.test_image(tmp_path / "i.png")

    def embeds(question):
        inputs = ckpt.preprocessor(image, question)
        return pipe.encode_image(inputs.pixel_values, inputs.crops, inputs.guide_ids)

    assert np.abs(embeds("what color is the circle?") - embeds("how many shapes are there?")).max() > 1e-3
    GatedFusion.ablate(model, "text")
    np.testing.assert_array_equal(embeds("what color is the circle?"), embeds("how many shapes are there?"))


def test_eval_ablate_reaches_the_family(demo_gated, tmp_path, capsys):
    """`tgedge eval --ablate gate|text` is the family's own ablation; a TG one on a gated model is refused."""
    data = write_folder(shapes.generate(shapes.SPLIT_SEEDS["eval"], 3), tmp_path / "eval")
    ckpt = demo_gated["adaptive_gating"]
    assert main(["eval", str(ckpt), "--data", str(data), "--ablate", "gate", "--json"]) == 0
    capsys.readouterr()
    model, pre = load_model(ckpt)
    pipe = TorchPipeline(model, pre.preprocessor).ablate("gate")
    assert model.mm_gated_fusion.ablation == "gate"
    assert main(["eval", str(ckpt), "--data", str(data), "--ablate", "fom"]) == 2
    assert "this model has no TG-FOM to ablate" in capsys.readouterr().err
    with pytest.raises(TgedgeError, match=r"unknown ablation 'x' \(choose from fom, dp, both, gate, text\)"):
        pipe.ablate("x")


# -- export, runtime, validate ------------------------------------------------------------------------------------
def _same_answers(export_dir, checkpoint, pairs, max_new_tokens=8):
    ref = TorchPipeline.from_checkpoint(checkpoint)
    with Pipeline(export_dir) as rt:
        for image, prompt in pairs:
            a = ref.answer(image, prompt, ref.options(max_new_tokens=max_new_tokens))
            b = rt.answer(image, prompt, rt.options(max_new_tokens=max_new_tokens))
            assert a.tokens == b.tokens, (prompt, a.text, b.text)


def test_demo_architecture_exports_and_validates(demo_export, demo_gated, samples, tmp_path):
    m = demo_export.manifest
    assert m.contract.family == "gated" and list(m.graphs) == ["text_guide", "vision", "fusion", "embed", "decoder"]
    raw = json.loads((demo_export.directory / "manifest.json").read_text())
    assert raw["fusion_family"] == "gated" and raw["model"]["gated_fusion"]["strategy"] == "adaptive_gating"
    import onnx

    ops = {n.op_type for n in onnx.load(str(m.graph_path("fusion"))).graph.node}
    assert {"Sigmoid", "Softmax", "LayerNormalization"} <= ops  # the gate and the cross-attention are in the graph
    records = read_folder(samples)
    _same_answers(demo_export.directory, demo_gated["adaptive_gating"], [(r.image, r.prompt) for r in records])
    report = validate(demo_export.directory, samples, show_progress=False)
    assert report.passed, report.summary()
    assert next(s for s in report.stages if s.name == "fusion").figures["max_abs"] < 1e-4


def test_inspect_reads_the_gated_export(demo_export, capsys):
    assert main(["inspect", str(demo_export.directory), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    fusion = out["graphs"]["fusion"]
    assert [t["name"] for t in fusion["inputs"]] == ["image_features", "text_features"] and not out["mismatches"]
    assert fusion["ops"]["Sigmoid"] == 1 and fusion["precision"] == "fp32"


def test_attention_weights_strategy_exports(demo_gated, samples, tmp_path):
    result = export_model(demo_gated["attention_weights"], tmp_path / "e")
    assert result.passed
    records = read_folder(samples)[:4]
    _same_answers(tmp_path / "e", demo_gated["attention_weights"], [(r.image, r.prompt) for r in records])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_plain_llava_twin_exports_and_validates(family, tmp_path):
    gated_dir, _ = gated_twin(tmp_path, family, "adaptive_gating" if family == "llama" else "attention_weights")
    result = export_model(gated_dir, tmp_path / "out")
    assert result.passed and result.manifest.contract.family == "gated"
    images = [tiny.test_image(tmp_path / f"{i}.png", size=(40 + 9 * i, 30 + 5 * i), seed=i) for i in range(3)]
    prompts = ["what color is the circle?", "how many are there?", "describe the image in a picture"]
    _same_answers(tmp_path / "out", gated_dir, list(zip(images, prompts)), 16)
    data = write_folder(shapes.generate(shapes.SPLIT_SEEDS["eval"], 4), tmp_path / "data")
    report = validate(tmp_path / "out", data, show_progress=False)
    assert report.passed, report.summary()


# -- quantize and build --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quantized(demo_export, root):
    from tgedge.calibration.quantize import quantize_export

    calib = write_folder(shapes.generate(shapes.SPLIT_SEEDS["calibration"], 16), root / "calib")
    return {p: quantize_export(demo_export.directory, root / p, p, calib=calib if p == "int8" else None).directory
            for p in ("fp16", "int8")}


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_quantized_exports_validate(precision, quantized, samples):
    report = validate(quantized[precision], samples, limit=8, show_progress=False)
    assert report.passed, report.summary()


def test_tensorrt_rtx_builds_the_gated_fusion_graph(demo_export, quantized, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT for RTX wheels (tensorrt-rtx-cu13-*) not installed")
    from tgedge.export.tensorrt_build import build_engines
    from tgedge.runtime.manifest import Manifest

    for name, export in (("fp32", demo_export.directory), ("int8", quantized["int8"])):
        build_engines(export, tmp_path / name, "tensorrt_rtx", graphs=["fusion"])
        meta = Manifest.load(tmp_path / name).engines["fusion"]
        assert (tmp_path / name / meta["file"]).stat().st_size > 1000 and meta["precision"] == name


# -- train-demo and demo-gated -------------------------------------------------------------------------------------
def test_train_demo_gated_few_steps(tmp_path):
    from tgedge.train_demo import TrainSettings, train_demo

    cfg = TrainSettings(vision_steps=2, answer_steps=2, batch=4, eval_every=2, eval_samples=5)
    out = train_demo(tmp_path / "ckpt", cfg, fusion="gated", strategy="attention_weights")
    model, _ = load_model(out)
    assert model.contract.family == "gated" and model.cfg.gated_fusion.strategy == "attention_weights"
    settings = json.loads((out / "train_settings.json").read_text())
    assert settings["fusion"] == "gated" and settings["gate_strategy"] == "attention_weights"
    assert not settings["ablate_tg"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"towers", "answers"} and "text_loss" in log[0]
    assert "train_log.jsonl" in (out / ".tgedge-output").read_text()  # written inside the atomic replacement


def test_train_demo_cli_argument_errors(tmp_path, capsys):
    assert main(["train-demo", "-o", str(tmp_path / "a"), "--fusion", "gated", "--no-tg"]) == 2
    assert "--no-tg means --fusion plain" in capsys.readouterr().err
    assert main(["train-demo", "-o", str(tmp_path / "b"), "--gate-strategy", "attention_weights"]) == 2
    assert "--gate-strategy is for --fusion gated" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_demo_gated_word(tmp_path, capsys, monkeypatch):
    """`demo-gated` works wherever `demo` does: the shipped gated checkpoint, answering through the CLI."""
    import tgedge

    monkeypatch.chdir(tmp_path)  # no folder named demo-gated here
    path = tgedge.demo_checkpoint("gated")
    assert path.name == tgedge.DEMO_FOLDERS["gated"] and tgedge.resolve_checkpoint("demo-gated") == path
    assert tgedge.resolve_checkpoint("demo") == tgedge.demo_checkpoint("tg")
    with pytest.raises(TgedgeError, match=r"no demo model of fusion family 'x' \(demo models: tg, gated\)"):
        tgedge.demo_checkpoint("x")
    image = tiny.test_image(tmp_path / "x.png")
    assert main(["run", "demo-gated", "--image", str(image), "--prompt", QUESTION, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"]


def test_demo_gated_accuracy_on_fixed_subset(tmp_path):
    """The done-when line of the shipped gated demo: >= 86% on the first 300 samples of the eval split."""
    from tgedge.evaluate import evaluate

    records = read_folder(write_folder(shapes.generate(shapes.SPLIT_SEEDS["eval"], 300), tmp_path / "eval300"))
    pipe = TorchPipeline.from_checkpoint("demo-gated")
    assert pipe.contract.family == "gated"
    options = pipe.options(max_new_tokens=4)
    report = evaluate(lambda image, prompt: pipe.answer(image, prompt, options).text, records)
    assert report.total == 300 and report.accuracy >= 0.86, report.per_type
