"""A conversation about images whose follow-up turns reuse the KV cache (docs/CONVERSATIONS.md).

    conv = Conversation(pipe, ["a.png"])      # a runtime Pipeline or the TorchPipeline
    conv.ask("what color is the circle?")      # the whole prompt prefilled
    conv.ask("and the square?")                # only the positions after the prefix the KV cache still holds

Each turn renders the whole conversation with the model's chat template (`PromptTemplate.render_turns`: the earlier
questions with the answers as they were shown), tokenises it and compares it with what the KV cache holds: the token
ids of every cached position, and the embeddings at the image positions. The longest prefix that matches stays in the
cache and the rest is prefilled, so a turn answers as a full recompute of the conversation does, never from a prefix
that no longer holds (a re-tokenised answer, or image tokens guided by another question, end the prefix there).

What guides the images of a follow-up (TG-LLaVA and the gated family, whose image tokens depend on the question;
the official TG-LLaVA code has no multi-turn inference, and its training guides the image with the conversation's
last question): `guide="latest"` (default) guides them with the newest question, as training did, so the cache is
kept up to the first image position and everything after it is prefilled again (the vision tower's output comes
from the stage cache); `guide="first"` keeps the first question's guide, so the image tokens never change and only
the new turn's positions are prefilled. Plain LLaVA's image tokens do not depend on the question: its follow-ups
reuse the whole prefix either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from tgedge.errors import TgedgeError
from tgedge.generate import Answer, answer_text
from tgedge.preprocess import load_image
from tgedge.prompt import IMAGE_TOKEN, split_question
from tgedge.sampling import GenerationOptions

GUIDES = ("latest", "first")


@dataclass
class Turn(Answer):
    """One answer of a conversation: `reused_tokens` of its `prompt_tokens` came from the KV cache."""
    reused_tokens: int = 0
    vision_cached: bool = False

    def to_dict(self) -> dict:
        return {**super().to_dict(), "reused_tokens": self.reused_tokens, "vision_cached": self.vision_cached}


class Conversation:
    """Turns about `images` (paths or PIL images, none for a text-only conversation) on one pipeline, whose KV cache
    it holds between turns (one conversation per pipeline at a time); `close()` or `reset()` lets it go."""

    def __init__(self, pipe, images=(), guide: str = "latest"):
        if guide not in GUIDES:
            raise TgedgeError(f"guide {guide!r}: choose from {', '.join(GUIDES)}")
        self.pipe, self.guide = pipe, guide
        self._open = False
        self.set_images(images)

    def set_images(self, images) -> None:
        """Other images: a new conversation (each is read and preprocessed here, once)."""
        images = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        self.views = [self.pipe.pre.pixels(im) for im in images]
        self.reset()

    def reset(self) -> None:
        """Start over: no turns, nothing kept in the KV cache."""
        self.turns: list[tuple[str, str]] = []
        self._held = np.zeros(0, np.int64)  # the token id at each position the KV cache holds
        self._held_images: np.ndarray | None = None  # the embeddings it holds at the image positions
        self._embeds: tuple[str | None, list[np.ndarray]] | None = None  # (guide, each image's embeddings)
        self._vision_cached = False
        self.close()

    def close(self) -> None:
        """Let the KV cache go (the turns are kept: a next turn prefills the whole conversation again)."""
        if self._open:
            self.pipe.clear_cache()
            self._open = False
        self._held = np.zeros(0, np.int64)

    def _guide_text(self, question: str) -> str | None:
        if not self.pipe.pre.spec.text_guide_length:
            return None  # no text guide: the image tokens do not depend on any question
        first = self.turns[0][0] if self.turns else question
        return split_question(question if self.guide == "latest" else first, len(self.views))

    def _image_embeds(self, guide: str | None) -> list[np.ndarray]:
        """Each image's embeddings under `guide`, computed again only when the guide changes."""
        if self._embeds is not None and self._embeds[0] == guide:
            self._vision_cached = True  # no stage ran: the conversation's own copy
            return self._embeds[1]
        pipe = self.pipe
        guide_ids = None if guide is None else pipe.pre.guide_ids(guide, 1)
        embeds = [np.asarray(pipe.encode_image(px, crops, guide_ids)) for px, crops in self.views]
        cache = pipe.stage_cache
        self._vision_cached = bool(cache is not None and cache.last_hit.get("vision"))
        self._embeds = (guide, embeds)
        return embeds

    def _reusable(self, ids: np.ndarray, x: np.ndarray, image_at: np.ndarray) -> int:
        """How many leading positions of the new prompt the KV cache holds as they are now (at least one
        position is always prefilled: its logits give the first token)."""
        n = min(len(self._held), len(ids) - 1)
        same = ids[:n] == self._held[:n]
        keep = n if same.all() else int(np.argmin(same))
        if self._held_images is not None and image_at.size:
            rows = image_at < keep
            changed = ~(x[image_at[rows]] == self._held_images[rows]).all(-1)
            if changed.any():
                keep = int(image_at[rows][np.argmax(changed)])
        return keep

    def ask(self, question: str, options: GenerationOptions | None = None,
            on_text: Callable[[str], None] | None = None) -> Turn:
        """The next turn: `question` answered after the whole conversation so far."""
        start = time.perf_counter()
        pipe, pre = self.pipe, self.pipe.pre
        if not isinstance(question, str) or not question.replace(IMAGE_TOKEN, "").strip():
            raise TgedgeError("empty question: ask something")
        options = options or pipe.options()
        prompt = pre.spec.template.render_turns([*self.turns, (question, None)], len(self.views))
        ids = pre.input_ids(prompt, len(self.views))[0]
        if len(ids) >= pipe.context:
            raise TgedgeError(f"the conversation is {len(ids)} tokens (image tokens included) after "
                              f"{len(self.turns)} turns, longer than the context ({pipe.context}): start a new "
                              "conversation (/reset in chat) or raise --max-context")
        embeds = self._image_embeds(self._guide_text(question)) if self.views else None
        x = np.asarray(pipe.embed(ids[None], None if embeds is None else np.concatenate(embeds)))[0]
        image_at = np.flatnonzero(ids == pre.spec.image_token_id) if self.views else np.zeros(0, np.int64)
        keep = self._reusable(ids, x, image_at)
        encoded = time.perf_counter()
        if not self._open:
            pipe.setup_cache(pipe.context)
            self._open = True
        try:
            text, result = answer_text(pipe, x[None, keep:], options, on_text, past=keep)
        except BaseException:
            self._held = np.zeros(0, np.int64)  # what the cache holds is unknown now: the next turn recomputes
            raise
        tokens = result.tokens
        self._held = np.concatenate([ids, np.asarray(tokens[:-1], np.int64)])  # the last token was never fed
        self._held_images = x[image_at]
        self.turns.append((question, text))
        timings = {"preprocess_encode_s": encoded - start, **result.timings}
        return Turn(text, tokens, len(ids), timings, reused_tokens=keep,
                    vision_cached=bool(self.views) and self._vision_cached)
