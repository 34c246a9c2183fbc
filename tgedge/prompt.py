"""Prompt templates: the TG-LLaVA reference's conversation templates, LLaVA's default, or a Jinja chat template.

The built-in templates reproduce `conversation.py` of the TG-LLaVA code (`vicuna_v1`, `qwen_2`, `llama_3`)
for a single user turn with an image, as its eval script builds it (`<image>\\n` + question); several images put
one `<image>\\n` each first, in order (transformers' LLaVA chat template renders image items first the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

from tgedge.errors import TgedgeError

IMAGE_TOKEN = "<image>"

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN2_SYSTEM = ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
                "The assistant gives helpful and honest answers.")
LLAMA3_SYSTEM = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and "
                 "vision assistant. You are able to understand the visual content that the user provides, and "
                 "assist the user with a variety of tasks using natural language.")

# name -> (start, user turn, assistant turn, the assistant's opening, stop strings): `conversation.py` of the TG-LLaVA
# code (vicuna_v1: SeparatorStyle.TWO with sep " " and sep2 "</s>"; qwen_2, llama_3: the role then the message then
# sep), and transformers' LLaVA-1.5 chat template for `llava` ("USER: " + text + " ", "ASSISTANT: " + text + " ").
BUILTIN_TEMPLATES = {
    "llava": ("", "USER: {}", " ASSISTANT: {} ", " ASSISTANT:", []),
    "vicuna_v1": (VICUNA_SYSTEM + " ", "USER: {}", " ASSISTANT: {}</s>", " ASSISTANT:", ["</s>"]),
    "qwen_2": (QWEN2_SYSTEM + "<|im_end|>", "<|im_start|>user\n{}<|im_end|>", "<|im_start|>assistant\n{}<|im_end|>",
               "<|im_start|>assistant\n", ["<|im_end|>"]),
    "llama_3": (LLAMA3_SYSTEM + "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
                "<|start_header_id|>assistant<|end_header_id|>\n\n{}<|eot_id|>",
                "<|start_header_id|>assistant<|end_header_id|>\n\n", ["<|eot_id|>"]),
}


@dataclass(frozen=True)
class PromptTemplate:
    """A built-in template by name, or a Jinja chat template's source (`jinja`)."""
    name: str
    jinja: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "jinja": self.jinja}

    @classmethod
    def from_dict(cls, d: dict) -> "PromptTemplate":
        return cls(d["name"], d.get("jinja"))

    @property
    def stop_strings(self) -> list[str]:
        return [] if self.jinja is not None else list(BUILTIN_TEMPLATES[self.name][4])

    def render(self, question: str, images: int = 1) -> str:
        """One user turn with the image placeholders first (one per image, in order, as transformers' LLaVA chat
        template renders image items), then the question, then the assistant's opening; `images` 0: a text-only
        turn, the question alone."""
        return self.render_turns([(question, None)], images)

    def render_turns(self, turns: list[tuple[str, str | None]], images: int = 1) -> str:
        """A whole conversation: (question, answer) pairs, the last answer None (the turn to answer, ending in the
        assistant's opening). The images' placeholders go first in the first question, as the TG-LLaVA code's
        `Conversation.get_prompt` moves `<image>` there; a later question may not hold one."""
        if not turns or turns[-1][1] is not None or any(a is None for _, a in turns[:-1]):
            raise ValueError("turns: answered (question, answer) pairs, then one (question, None)")
        questions = [split_question(turns[0][0], images)]
        for q, _ in turns[1:]:
            if IMAGE_TOKEN in q:
                raise TgedgeError(f"a follow-up question may not hold {IMAGE_TOKEN}: the images belong to the "
                                  "conversation's first turn (start a new conversation for another image)")
            questions.append(q.strip())
        questions[0] = f"{IMAGE_TOKEN}\n" * images + questions[0]
        pairs = [(q, a) for q, (_, a) in zip(questions, turns, strict=True)]
        if self.jinja is not None:
            return _render_jinja(self.jinja, pairs, images)
        start, user, assistant, opening, _ = BUILTIN_TEMPLATES[self.name]
        out = start
        for i, (q, a) in enumerate(pairs):
            out += user.format(q) + (opening if a is None else assistant.format(a))
        return out


def _counted(n: int, what: str) -> str:
    return f"{'one' if n == 1 else n} {what}{'' if n == 1 else 's'}"


def split_question(text: str, images: int = 1) -> str:
    """The question with its image placeholders removed, as the reference's text guide sees it: none, or one per
    image (the template places the images either way)."""
    n = text.count(IMAGE_TOKEN)
    if n not in (0, images):
        takes = "one image takes one" if images == 1 else f"{images} images take {images} (or none)"
        raise TgedgeError(f"prompt has {n} {IMAGE_TOKEN} placeholders; {takes}")
    return text.replace(IMAGE_TOKEN, "").strip()


def check_raw_prompt(text: str, images: int = 1) -> str:
    n = text.count(IMAGE_TOKEN)
    if n != images:
        if images == 1:
            raise TgedgeError(f"raw prompt must contain {IMAGE_TOKEN} exactly once (found {n})")
        raise TgedgeError(f"raw prompt has {_counted(n, IMAGE_TOKEN + ' marker')} for {images} images: it needs one "
                          "per image, in the images' order")
    return text


def _render_jinja(source: str, pairs: list[tuple[str, str | None]], images: int = 1) -> str:
    """Messages as transformers' processors pass them: content lists, the image items first in the first user
    message; `images` placeholders already lead the first question in `pairs` and are taken off it here."""
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is a base dependency
        raise TgedgeError("this checkpoint's chat template needs jinja2: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = []
    for i, (q, a) in enumerate(pairs):
        text = q[len(f"{IMAGE_TOKEN}\n") * images:] if i == 0 else q
        content = ([{"type": "image"}] * images if i == 0 else []) + [{"type": "text", "text": text}]
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    try:
        return env.from_string(source).render(messages=messages, add_generation_prompt=True)
    except Exception as e:  # a template is user input: any failure is a bad-input error
        raise TgedgeError(f"chat template failed to render: {e}") from None


def template_for_family(family: str, vocab_has_llama3_headers: bool) -> PromptTemplate:
    """The reference's choice for original-layout checkpoints: by decoder family."""
    if family == "qwen2":
        return PromptTemplate("qwen_2")
    return PromptTemplate("llama_3" if vocab_has_llama3_headers else "vicuna_v1")
