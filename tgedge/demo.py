"""Helpers around the demo model: word-level tokenizers and a sample picture. The trained model itself is
`tgedge.demo_checkpoint()`; an untrained one of its architecture is `tgedge.train_demo.random_tg_checkpoint`."""

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
