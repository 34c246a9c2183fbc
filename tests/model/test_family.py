"""A fusion family is one model file plus one registry entry: a toy family, registered here and touching no other
file, gets its stages, preprocessing, model, weights' names, ablation and CLI choices from that entry alone."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from tgedge import demo_checkpoint
from tgedge.checkpoint import load_checkpoint, load_state
from tgedge.cli import build_parser
from tgedge.contract import (BATCH, FAMILIES, FusionFamily, TensorMeta, ablation_choices, family_of,
                             preprocess_needs, register_family)
from tgedge.demo import shapes_image
from tgedge.layouts import hf, rename
from tgedge.model import TGLlava
from tgedge.model.text import TextGuideEncoder
from tgedge.reference import TorchPipeline
from tgedge.weights import LazyWeights


# -- the "model file": F' = F + W t (the pooled question, projected to the vision width), then the projector --------
class ToyFusion:
    @staticmethod
    def build(model, cfg) -> None:
        model.text_tower = TextGuideEncoder(cfg.text_guide)
        model.mm_toy = nn.Linear(cfg.text_guide.hidden_size, cfg.vision.hidden_size)

    @staticmethod
    def fuse(model, image_features, text_pooled) -> torch.Tensor:
        return model.multi_modal_projector(image_features + model.mm_toy(text_pooled)[:, None])

    @staticmethod
    @torch.no_grad()
    def ablate(model, which: str) -> None:
        model.mm_toy.weight.zero_()
        model.mm_toy.bias.zero_()


# -- the "registry entry" ---------------------------------------------------------------------------------------
def _toy_inputs(cfg: dict) -> list[TensorMeta]:
    vision, text = cfg["vision"], cfg["text_guide"]
    return [TensorMeta("image_features", "float32", (BATCH, vision["num_features"], vision["hidden_size"])),
            TensorMeta("text_pooled", "float32", (BATCH, text["hidden_size"]))]


TOY = FusionFamily("toy", f"{__name__}:ToyFusion", detects=lambda cfg: cfg["model_type"] == "llava_toy",
                   uses_text_guide=lambda cfg: True, views=lambda cfg: 1, fusion_inputs=_toy_inputs,
                   num_image_tokens=lambda cfg: cfg["vision"]["num_features"], ablations=("toy",))


@pytest.fixture
def toy():
    register_family(TOY)
    try:
        yield TOY
    finally:
        FAMILIES.pop(TOY.name)


@pytest.fixture(scope="module")
def gated_ckpt():
    return load_checkpoint(demo_checkpoint("gated"))  # a text tower and its tokenizer to borrow


def test_toy_family_from_its_entry_alone(toy, gated_ckpt, tmp_path):
    cfg = dataclasses.replace(gated_ckpt.config, gated_fusion=None, model_type="llava_toy")
    d = cfg.to_dict()
    assert family_of(d) is toy and list(FAMILIES)[-1] == "plain"  # registered ahead of plain, which takes any LLaVA
    assert cfg.has_tg and cfg.num_image_tokens == cfg.vision.num_features
    needs = preprocess_needs(d)
    assert needs == {"num_image_tokens": cfg.vision.num_features, "detail_crops": False,
                     "text_guide_length": cfg.text_guide.max_position_embeddings}

    torch.manual_seed(0)
    model = TGLlava(cfg).eval()
    contract = model.contract
    assert contract.family == "toy" and contract.stage_names == ("text_guide", "vision", "fusion", "embed", "decoder")
    assert contract.stages["fusion"].input_names == ["image_features", "text_pooled"]
    assert "mm_toy." in model.stage_prefixes("fusion")

    # its weights keep their names through the HF / tgedge layouts' renames, and load strictly
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = rename(list(state), hf.PREFIXES)
    assert names["mm_toy.weight"] == "mm_toy.weight"
    load_state(model, LazyWeights.from_tensors(state), gated_ckpt.path)

    pipe = TorchPipeline(model, gated_ckpt.preprocessor.replace(**needs), context=256)
    inputs = pipe.pre(shapes_image(tmp_path / "shapes.png"), "what color is the circle?")
    assert inputs.guide_ids is not None and inputs.crops is None
    assert pipe.answer_inputs(inputs, pipe.options(max_new_tokens=2)).tokens
    embeds = pipe.encode_image(inputs.pixel_values, inputs.crops, inputs.guide_ids)
    pipe.ablate("toy")  # the family's own ablation, found through its entry
    assert model.mm_toy.weight.abs().sum() == 0
    assert not np.array_equal(embeds, pipe.encode_image(inputs.pixel_values, inputs.crops, inputs.guide_ids))

    # the CLI's choices are the registry's
    assert "toy" in ablation_choices()
    parser = build_parser()
    assert parser.parse_args(["eval", "demo", "--data", "x", "--ablate", "toy"]).ablate == "toy"
    assert parser.parse_args(["train-demo", "-o", "x", "--fusion", "toy"]).fusion == "toy"
