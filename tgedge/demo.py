"""A small TG-LLaVA built from scratch (random weights) for the end-to-end demo and for tests.

The trained embedded demo model replaces the random weights when it lands; until then `make demo`
shows the pipeline working end to end and says plainly that the answer is untrained noise.
"""

from __future__ import annotations

from pathlib import Path

PUNCTUATION = [":", "?", ".", ",", "\n"]


def word_tokenizer(path: Path, specials: list[str], bos: str | None, eos: str | None = None,
                   words: list[str] | None = None) -> Path:
    """A word-level tokenizer.json; `bos`/`eos` are added by its post-processor, as real tokenizers do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from tgedge.data.shapes import vocabulary

    vocab: dict[str, int] = {}
    for w in specials + (vocabulary() + PUNCTUATION if words is None else list(words)):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(specials)
    single = " ".join(x for x in (bos, "$A", eos) if x)
    tok.post_processor = processors.TemplateProcessing(single=single,
                                                       special_tokens=[(t, vocab[t]) for t in (bos, eos) if t])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def random_tg_checkpoint(out: Path, seed: int = 0) -> Path:
    """Write an untrained tiny TG-LLaVA (TG-FOM + TG-DP, LLaMA decoder) in tgedge's layout."""
    import tempfile

    import torch

    from tgedge import config as C
    from tgedge.checkpoint import save_checkpoint
    from tgedge.model import TGLlava
    from tgedge.preprocess import ImageSettings, Preprocessor, PreprocessSpec, Tokenizer
    from tgedge.prompt import PromptTemplate

    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(word_tokenizer(Path(tmp) / "tokenizer.json", ["<unk>", "<s>", "</s>", "<image>"], "<s>"))
        guide = Tokenizer(word_tokenizer(Path(tmp) / "guide.json", ["!", "<|startoftext|>", "<|endoftext|>"],
                                         "<|startoftext|>", "<|endoftext|>"))
        vision = C.VisionConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, image_size=56,
                                patch_size=14)
        text = C.TextGuideConfig(vocab_size=guide.vocab_size, hidden_size=48, intermediate_size=96, num_layers=2,
                                 num_heads=4, max_position_embeddings=32, eos_token_id=guide.token_to_id("<|endoftext|>"))
        decoder = C.DecoderConfig(family="llama", vocab_size=tok.vocab_size, hidden_size=96, intermediate_size=192,
                                  num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
        fom, dp = C.tg_configs({"tg_fom_num_heads": 4, "tg_dp_num_latents": 16, "tg_dp_num_heads": 4,
                                "tg_dp_head_dim": 16, "tg_dp_num_kv_heads": 2}, vision, text, decoder.hidden_size,
                               True, True)
        cfg = C.ModelConfig(layout=C.TGEDGE_LAYOUT, vision=vision, projector=C.ProjectorConfig(64, 96),
                            decoder=decoder, text_guide=text, feature_mask=fom, detail_perceiver=dp,
                            image_token_index=tok.token_to_id("<image>"), pad_to_square=True,
                            bos_token_id=tok.token_to_id("<s>"), eos_token_id=[tok.token_to_id("</s>")])
        torch.manual_seed(seed)
        model = TGLlava(cfg)
        with torch.no_grad():  # random, and zero_layer non-zero so that TG-FOM takes part
            torch.nn.init.normal_(model.mm_cross_attn.zero_layer.weight, std=0.02)
        spec = PreprocessSpec(image=ImageSettings(shortest_edge=56, crop_hw=(56, 56)),
                              template=PromptTemplate("vicuna_v1"), num_image_tokens=cfg.num_image_tokens,
                              image_token_id=cfg.image_token_index, pad_to_square=True, detail_crops=True,
                              text_guide_length=text.max_position_embeddings, eos_token_ids=cfg.eos_token_id)
        return save_checkpoint(model, Preprocessor(spec, tok, guide), out)


def shapes_image(path: Path) -> Path:
    """A grey picture with a red circle and a blue square."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 80), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 40, 40), fill=(220, 30, 30))
    draw.rectangle((55, 35, 85, 65), fill=(30, 30, 220))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
