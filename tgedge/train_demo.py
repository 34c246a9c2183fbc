"""Train the embedded demo TG-LLaVA from scratch on the shapes task, in stages as LLaVA is built.

Stage 1 (towers): the vision tower learns dense labels the generator knows for free - per patch, which
(shape, colour, size) covers it and whether a shape's centre lies in it - on the main view and on the
x2 crops; the text tower learns what a question asks (type, shape, colour, position) from its pooled
output. Stage 2 (answers): the vision tower fine-tuned at a tenth of the learning rate, projector + decoder + the
fusion modules (TG-FOM + TG-DP, or gated fusion) + text tower learn to answer (answer token + EOS) with teacher
forcing. Seeded; data is generated on the fly.

Fusion families (`fusion`): `tg` (the shipped demo), `gated` (gated cross-modal fusion in place of TG-FOM and
TG-DP) and `plain` (LLaVA: no text tower). All three share the architecture sizes of their common parts and start
from the same initial weights there (the TG model is built first, then its fusion modules are swapped).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tgedge import config as C
from tgedge.data import shapes
from tgedge.errors import TgedgeError
from tgedge.model import TGLlava
from tgedge.preprocess import ImageSettings, Preprocessor, PreprocessSpec, Tokenizer, detail_crops
from tgedge.prompt import PromptTemplate

FUSIONS = ("tg", "gated", "plain")  # the families this trainer builds demo models of (a FAMILIES name each)
GATED_DEMO = {"num_layers": 2, "num_heads": 4}  # 2 layers as TG-FOM's Q-Former; 4 heads of 24 as the vision tower
LLM_SPECIALS = ["<unk>", "<s>", "</s>", "<image>"]
GUIDE_SPECIALS = ["!", "<|startoftext|>", "<|endoftext|>"]  # "!" at id 0, as in CLIP's vocabulary


@dataclass
class TrainSettings:
    seed: int = 0
    vision_steps: int = 4000
    answer_steps: int = 4500
    batch: int = 48
    lr: float = 1e-3
    vision_lr_scale: float = 0.1  # stage 2: 0 freezes the vision tower, else its learning rate is lr x this
    image_px: int = 112  # generated picture size; the model sees 64 px views
    eval_every: int = 500
    eval_samples: int = 250


def build_demo_model(directory: Path, fusion: str = "tg",
                     strategy: str = "adaptive_gating") -> tuple[TGLlava, Preprocessor]:
    """The demo architecture (~2M parameters) of a fusion family and its tokenizers, written under `directory`.

    `plain` and `gated` are the TG model with its fusion modules swapped, so that the parts they share get the
    same initial weights for a seed (and `plain` the weights of the published `--no-tg` run)."""
    if fusion not in FUSIONS:
        raise TgedgeError(f"unknown demo fusion family {fusion!r} (choose from {', '.join(FUSIONS)})")
    from tgedge.demo import PUNCTUATION, word_tokenizer

    words = shapes.vocabulary() + ["USER", "ASSISTANT"] + PUNCTUATION
    tok = Tokenizer(word_tokenizer(directory / "tokenizer.json", LLM_SPECIALS, "<s>", words=words))
    guide = Tokenizer(word_tokenizer(directory / "guide.json", GUIDE_SPECIALS, "<|startoftext|>", "<|endoftext|>",
                                     words=shapes.vocabulary() + PUNCTUATION))
    vision = C.VisionConfig(hidden_size=96, intermediate_size=384, num_layers=4, num_heads=4, image_size=64,
                            patch_size=8)
    text = C.TextGuideConfig(vocab_size=guide.vocab_size, hidden_size=64, intermediate_size=256, num_layers=2,
                             num_heads=4, max_position_embeddings=32, eos_token_id=guide.token_to_id("<|endoftext|>"))
    decoder = C.DecoderConfig(family="llama", vocab_size=tok.vocab_size, hidden_size=128, intermediate_size=384,
                              num_layers=3, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    fom = C.FeatureMaskConfig(num_queries=vision.num_patches, hidden_size=vision.hidden_size,
                              text_width=text.hidden_size, num_heads=4)
    dp = C.DetailPerceiverConfig(vision_width=vision.hidden_size, text_width=text.hidden_size,
                                 llm_width=decoder.hidden_size, num_positions=4 * vision.num_patches, num_latents=16,
                                 num_heads=4, head_dim=24, num_kv_heads=2)
    cfg = C.ModelConfig(layout=C.TGEDGE_LAYOUT, vision=vision, projector=C.ProjectorConfig(96, 128), decoder=decoder,
                        text_guide=text, feature_mask=fom, detail_perceiver=dp,
                        image_token_index=tok.token_to_id("<image>"), pad_to_square=True,
                        bos_token_id=tok.token_to_id("<s>"), eos_token_id=[tok.token_to_id("</s>")])
    spec = PreprocessSpec(image=ImageSettings(shortest_edge=64, crop_hw=(64, 64)), template=PromptTemplate("llava"),
                          num_image_tokens=cfg.num_image_tokens, image_token_id=cfg.image_token_index,
                          pad_to_square=True, detail_crops=True, text_guide_length=text.max_position_embeddings,
                          eos_token_ids=cfg.eos_token_id)
    model, pre = TGLlava(cfg), Preprocessor(spec, tok, guide)
    if fusion == "tg":
        return model, pre
    model.without_tg()
    if fusion == "plain":  # no text guide either
        model.text_tower = None
        return model, pre.replace(num_image_tokens=model.cfg.num_image_tokens, detail_crops=False)
    from tgedge.model.fusion_gated import GatedCrossModalFusion

    gated = C.GatedFusionConfig(vision_width=vision.hidden_size, text_width=text.hidden_size, strategy=strategy,
                                **GATED_DEMO)
    model.cfg = dataclasses.replace(model.cfg, text_guide=text, gated_fusion=gated)
    model.mm_gated_fusion = GatedCrossModalFusion(gated)
    return model, pre.replace(num_image_tokens=model.cfg.num_image_tokens, detail_crops=False)


class Batches:
    """On-the-fly batches from one seeded stream of shapes samples."""

    def __init__(self, pre: Preprocessor, seed: int, image_px: int):
        self.pre, self.rng, self.px = pre, np.random.default_rng(seed), image_px
        self.grid = pre.spec.image.crop_hw[0] // 8

    def draw(self, n: int) -> list[shapes.Sample]:
        return [shapes.sample(self.rng, self.px) for _ in range(n)]

    def vision(self, n: int):
        """Views (main + one random crop per picture) with per-patch class and centre targets."""
        views, cls, centre = [], [], []
        half = self.px // 2
        boxes = [(0, 0, half, half), (half, 0, self.px, half), (0, half, half, self.px), (half, half, self.px, self.px)]
        for s in self.draw(n):
            labels = shapes.label_map(s.placed, self.px)
            main = self.pre.pixels(s.image)[0][0]
            crops = detail_crops(main)  # also without TG-DP, so both ablation arms pre-train the tower alike
            q = int(self.rng.integers(4))
            for view, box in ((main, (0, 0, self.px, self.px)), (crops[q], boxes[q])):
                c, z = shapes.patch_labels(labels, s.placed, box, self.grid)
                views.append(view), cls.append(c), centre.append(z)
        return torch.from_numpy(np.stack(views)), torch.from_numpy(np.stack(cls)), torch.from_numpy(np.stack(centre))

    def questions(self, samples: list[shapes.Sample], with_answer: bool = True):
        """Model inputs for a batch; with answers, the ids run on to answer + EOS and targets mark them."""
        pre = self.pre
        eos = pre.spec.eos_token_ids[0]
        ids, targets, pix, crops, guides = [], [], [], [], []
        for s in samples:
            inputs = pre(s.image, s.prompt)
            prompt = inputs.input_ids[0].tolist()
            answer = pre.tokenizer.encode(s.answer, add_special_tokens=False) + [eos] if with_answer else []
            ids.append(prompt + answer)
            targets.append([-100] * (len(prompt) - 1) + answer + [-100])
            pix.append(inputs.pixel_values[0])
            if inputs.crops is not None:
                crops.append(inputs.crops[0])
            if inputs.guide_ids is not None:
                guides.append(inputs.guide_ids[0].tolist())
        pad = lambda rows, v: torch.tensor([r + [v] * (max(map(len, rows)) - len(r)) for r in rows])  # noqa: E731
        return (pad(ids, eos), pad(targets, -100), torch.from_numpy(np.stack(pix)),
                torch.from_numpy(np.stack(crops)) if crops else None,
                pad(guides, 0) if guides else None)  # guide padding uses id 0, which the text tower masks


class GuideHeads(nn.Module):
    """Stage-1 targets for the text tower: what the question asks."""

    FIELDS = {"kind": shapes.QUESTION_TYPES, "shape": ("none",) + shapes.SHAPES,
              "color": ("none",) + tuple(shapes.COLORS), "position": ("none",) + shapes.POSITIONS}

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({k: nn.Linear(width, len(v)) for k, v in self.FIELDS.items()})

    @classmethod
    def targets(cls, samples: list[shapes.Sample]) -> dict[str, torch.Tensor]:
        out = {k: [] for k in cls.FIELDS}
        for s in samples:
            q = s.prompt
            out["kind"].append(shapes.QUESTION_TYPES.index(s.type))
            out["shape"].append(next((i + 1 for i, k in enumerate(shapes.SHAPES) if k in q), 0))
            out["color"].append(next((i + 1 for i, c in enumerate(shapes.COLORS) if f" {c} " in q), 0))
            pos = [i + 1 for i, p in enumerate(shapes.POSITIONS) if q.endswith(f"the {p}?")]
            out["position"].append(pos[0] if pos else 0)
        return {k: torch.tensor(v) for k, v in out.items()}


def _cosine(step: int, total: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def train_towers(model: TGLlava, batches: Batches, cfg: TrainSettings, log, progress) -> None:
    vis = model.vision_tower
    width = model.cfg.vision.hidden_size
    cls_head, centre_head = nn.Linear(width, shapes.NUM_CLASSES), nn.Linear(width, 2)
    text = model.text_tower
    guide_heads = GuideHeads(model.cfg.text_guide.hidden_size) if text is not None else None
    params = [*vis.parameters(), *cls_head.parameters(), *centre_head.parameters()]
    if text is not None:
        params += [*text.parameters(), *guide_heads.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    for step in range(cfg.vision_steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, cfg.vision_steps, cfg.lr)
        views, cls, centre = batches.vision(cfg.batch // 2)
        feats = model.vision(views)  # (V, N, D)
        loss_cls = F.cross_entropy(cls_head(feats).flatten(0, 1), cls.flatten())
        loss_centre = F.cross_entropy(centre_head(feats).flatten(0, 1), centre.flatten(), weight=torch.tensor([1., 5.]))
        loss_text = torch.zeros(())
        if text is not None:
            samples = batches.draw(cfg.batch)
            _, pooled = model.text_guide(batches.questions(samples, with_answer=False)[4])
            tgt = GuideHeads.targets(samples)
            loss_text = sum(F.cross_entropy(guide_heads.heads[k](pooled), tgt[k]) for k in tgt)
        loss = loss_cls + loss_centre + loss_text
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.vision_steps - 1:
            acc = (cls_head(feats).argmax(-1) == cls).float()
            fg = cls > 0
            log({"stage": "towers", "step": step, "loss": loss.item(), "patch_acc": acc.mean().item(),
                 "shape_patch_acc": acc[fg].mean().item() if fg.any() else None, "text_loss": loss_text.item()})
        progress()


@torch.no_grad()
def first_token_accuracy(model: TGLlava, batches: Batches, samples: list[shapes.Sample]) -> dict[str, float]:
    """Accuracy of the argmax at the answer position (the answers are one token each), per type."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for i in range(0, len(samples), 50):
        chunk = samples[i:i + 50]
        ids, targets, pix, crops, guide = batches.questions(chunk)
        logits = _logits(model, ids, pix, crops, guide)
        pos = (targets != -100).int().argmax(-1)
        pred = logits[torch.arange(len(chunk)), pos].argmax(-1)
        want = targets[torch.arange(len(chunk)), pos]
        for s, ok in zip(chunk, (pred == want).tolist()):
            hits.setdefault(s.type, []).append(ok)
    model.train()
    out = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["all"] = sum(sum(v) for v in hits.values()) / len(samples)
    return out


def _image_embeds(model: TGLlava, pix, crops, guide) -> torch.Tensor:
    """Image embeddings of a training batch. Gated fusion attends to every text-guide token, and a batch pads the
    guide with id 0: it gets `text_mask` so that it computes what the unpadded batch-1 inference path computes."""
    if model.contract.family != "gated":
        return model.encode_image(pix, crops, guide)
    text_features, _ = model.text_guide(guide)
    return model.fuse(model.vision(pix), text_features=text_features, text_mask=guide != 0)


def _logits(model: TGLlava, ids, pix, crops, guide) -> torch.Tensor:
    x = model.embed(ids, _image_embeds(model, pix, crops, guide))
    return model(x, torch.arange(ids.shape[1]))


def train_answers(model: TGLlava, batches: Batches, cfg: TrainSettings, held_out, log, progress) -> None:
    vision = list(model.vision_tower.parameters())
    model.vision_tower.requires_grad_(cfg.vision_lr_scale > 0)
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision_tower.")]
    groups = [{"params": rest, "scale": 1.0}]
    if cfg.vision_lr_scale > 0:
        groups.append({"params": vision, "scale": cfg.vision_lr_scale})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    for step in range(cfg.answer_steps):
        for group in opt.param_groups:
            group["lr"] = _cosine(step, cfg.answer_steps, cfg.lr) * group["scale"]
        ids, targets, pix, crops, guide = batches.questions(batches.draw(cfg.batch))
        logits = _logits(model, ids, pix, crops, guide)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            log({"stage": "answers", "step": step, "loss": loss.item()})
        if (step + 1) % cfg.eval_every == 0 or step == cfg.answer_steps - 1:
            log({"stage": "answers", "step": step, "held_out_first_token_acc": first_token_accuracy(model, batches,
                                                                                                    held_out)})
        progress()


def train_demo(out: Path, cfg: TrainSettings, fusion: str = "tg", strategy: str = "adaptive_gating",
               ablate_tg: bool = False, force: bool = False) -> Path:
    """Train and save a checkpoint of a fusion family (`FUSIONS`) in tgedge's layout, `train_log.jsonl` (the curve)
    and `train_settings.json` inside it. `ablate_tg` is the older spelling of `fusion="plain"`; `strategy` is the
    gated family's gate. `out` follows the output rule (`force` to replace)."""
    import tempfile

    from tqdm import tqdm

    from tgedge.checkpoint import save_checkpoint

    if ablate_tg:
        if fusion not in ("tg", "plain"):
            raise TgedgeError(f"ablate_tg trains the plain family; it cannot be combined with fusion={fusion!r}")
        fusion = "plain"
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        model, pre = build_demo_model(Path(tmp), fusion, strategy)
        model.train()
        batches = Batches(pre, cfg.seed, cfg.image_px)
        held_out = list(shapes.generate(seed=10_000 + cfg.seed, count=cfg.eval_samples, size=cfg.image_px))
        records: list[dict] = []
        start = time.perf_counter()

        def log(row):
            row["elapsed_s"] = round(time.perf_counter() - start, 1)
            records.append(row)
            tqdm.write(json.dumps(row))

        with tqdm(total=cfg.vision_steps + cfg.answer_steps, desc="train-demo", unit="step") as bar:
            train_towers(model, batches, cfg, log, bar.update)
            train_answers(model, batches, cfg, held_out, log, bar.update)
        model.eval()
        settings = {**cfg.__dict__, "fusion": fusion, **({"gate_strategy": strategy} if fusion == "gated" else {}),
                    "ablate_tg": fusion == "plain", "seconds": round(time.perf_counter() - start, 1)}
        return save_checkpoint(model, pre, out, force=force, extra_files={
            "train_log.jsonl": "".join(json.dumps(r) + "\n" for r in records),
            "train_settings.json": json.dumps(settings) + "\n"})


def random_tg_checkpoint(out: Path, seed: int = 0) -> Path:
    """The demo architecture with untrained weights (zero_layer non-zero so that TG-FOM takes part), in
    tgedge's layout: a full TG-LLaVA checkpoint for tests, seconds to make."""
    import tempfile

    from tgedge.checkpoint import save_checkpoint
    from tgedge.model.fusion_tg import feature_mask

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, pre = build_demo_model(Path(tmp))
        with torch.no_grad():
            torch.nn.init.normal_(feature_mask(model).zero_layer.weight, std=0.02)
        return save_checkpoint(model, pre, out)


def random_gated_checkpoint(out: Path, seed: int = 0, strategy: str = "adaptive_gating") -> Path:
    """The demo architecture with gated fusion and untrained weights, in tgedge's layout. The residual branches'
    last layers and the gate (zero at initialisation) get random values so that the text context and the gate
    take part: a gated checkpoint for tests, seconds to make."""
    import tempfile

    from tgedge.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        model, pre = build_demo_model(Path(tmp), "gated", strategy)
        randomize_gated_fusion(model)
        return save_checkpoint(model, pre, out)


@torch.no_grad()
def randomize_gated_fusion(model: TGLlava, std: float = 0.1) -> None:
    """Non-zero values for what gated fusion initialises at zero (tests: the text path and the gate then count)."""
    for name, p in model.mm_gated_fusion.named_parameters():
        if name.endswith(("out_proj.weight", "fc2.weight", "gate.proj.weight", "gate.score.weight")):
            p.normal_(0, std)
        elif name.endswith(("out_proj.bias", "fc2.bias", "gate.proj.bias")):
            p.normal_(0, std / 2)
