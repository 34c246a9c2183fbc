"""Conversations: every follow-up turn, reusing the KV cache, answers as a full recompute of the conversation does."""

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from tgedge.checkpoint import load_model
from tgedge.conversation import Conversation
from tgedge.errors import TgedgeError
from tgedge.pipelines import open_pipeline
from tgedge.reference import TorchPipeline

QUESTIONS = ["what color is the circle?", "how many shapes are there?", "is there a red square?",
             "what color is the square?"]
N = 8  # tokens per answer, end-of-sequence ignored: every turn's answer is 8 tokens long


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    from tgedge.demo import shapes_image

    return shapes_image(tmp_path_factory.mktemp("img") / "shapes.png")


def options(pipe):
    return pipe.options(max_new_tokens=N, eos_token_ids=[], stop_strings=[])


def talk(pipe, other, images, guide, questions=QUESTIONS):
    """Each turn on `pipe` (one conversation) against a fresh answer of the whole rendered conversation on `other`
    (another pipeline of the same model: no cache shared); returns the turns."""
    conv = Conversation(pipe, images, guide)
    turns = []
    for q in questions:
        prompt = pipe.pre.spec.template.render_turns([*conv.turns, (q, None)], len(images))
        turn = conv.ask(q, options(pipe))
        if pipe.pre.spec.text_guide_length:
            fresh = other.answer(images, prompt, options(other), raw=True,
                                 guide=q if guide == "latest" else questions[0])
        else:
            fresh = other.answer(images, prompt, options(other), raw=True)
        assert (turn.tokens, turn.prompt_tokens) == (fresh.tokens, fresh.prompt_tokens), q
        assert len(turn.tokens) == N
        turns.append(turn)
    conv.close()
    assert turns[0].reused_tokens == 0
    assert [t.prompt_tokens for t in turns] == sorted({t.prompt_tokens for t in turns})  # each turn longer
    return turns


def first_image_position(pipe, images):
    ids = pipe.pre(images, QUESTIONS[0]).input_ids[0]
    return int(np.flatnonzero(ids == pipe.pre.spec.image_token_id)[0])


def check_reuse(pipe, images, guide, turns):
    """latest: the image tokens change with each question, so the cache holds up to the first image position;
    first: the whole previous prompt at least (its answer too where it tokenises back to the same ids)."""
    for before, turn in zip(turns, turns[1:]):
        if guide == "latest" and pipe.pre.spec.text_guide_length:
            assert turn.reused_tokens == first_image_position(pipe, images)
        else:
            assert before.prompt_tokens <= turn.reused_tokens < turn.prompt_tokens


@pytest.mark.parametrize("guide", ["latest", "first"])
def test_demo_reference_turns_equal_recompute(image, guide):
    pipe, other = open_pipeline("demo", None), open_pipeline("demo", None)
    check_reuse(pipe, [image], guide, talk(pipe, other, [image], guide))


@pytest.mark.parametrize("mode", ["growing", "static", "static-onnx"])
def test_demo_export_turns_equal_recompute(image, mode, demo_export, demo_static_exports):
    directory = demo_export.directory if mode == "growing" else demo_static_exports(mode).directory
    pipe, other = open_pipeline(str(directory), None), open_pipeline(str(directory), None)
    for guide in ("latest", "first"):
        check_reuse(pipe, [image], guide, talk(pipe, other, [image], guide))


def test_two_images_and_the_stage_cache(image, tmp_path):
    from tgedge.stagecache import StageCache

    second = tiny.test_image(tmp_path / "b.png", size=(60, 44), seed=3)
    pipe, other = open_pipeline("demo", None), open_pipeline("demo", None)
    pipe.use_stage_cache(StageCache(64 << 20))
    turns = talk(pipe, other, [image, second], "latest", QUESTIONS[:3])
    assert [t.vision_cached for t in turns] == [False, True, True]


def test_a_changed_prefix_is_recomputed_from_where_it_differs(image):
    pipe, other = open_pipeline("demo", None), open_pipeline("demo", None)
    conv = Conversation(pipe, [image], "first")
    first = conv.ask(QUESTIONS[0], options(pipe))
    conv.turns[0] = (QUESTIONS[0], "blue blue")  # the history no longer says what the cache holds
    prompt = pipe.pre.spec.template.render_turns([*conv.turns, (QUESTIONS[1], None)], 1)
    turn = conv.ask(QUESTIONS[1], options(pipe))
    assert turn.reused_tokens <= first.prompt_tokens  # not past where the answer's tokens begin
    assert turn.tokens == other.answer(image, prompt, options(other), raw=True, guide=QUESTIONS[0]).tokens
    conv.reset()
    assert conv.ask(QUESTIONS[1], options(pipe)).reused_tokens == 0


def test_a_closed_conversation_recomputes_its_history(image):
    """close() lets the KV cache go and keeps the turns (what serving does to the oldest conversation): the next turn
    prefills the whole conversation and answers as before."""
    pipe, other = open_pipeline("demo", None), open_pipeline("demo", None)
    kept, closed = Conversation(pipe, [image], "first"), Conversation(other, [image], "first")
    for q in QUESTIONS[:2]:
        kept.ask(q, options(pipe))
        closed.ask(q, options(other))
    closed.close()
    want, got = kept.ask(QUESTIONS[2], options(pipe)), closed.ask(QUESTIONS[2], options(other))
    assert got.tokens == want.tokens and (got.reused_tokens, want.reused_tokens > 0) == (0, True)


def test_beyond_the_context_is_a_clear_error_and_reset_recovers(image):
    pipe = TorchPipeline.from_checkpoint("demo", context=120)
    conv = Conversation(pipe, [image], "first")
    with pytest.raises(TgedgeError, match=r"the conversation is \d+ tokens .* longer than the context \(120\): start "
                                          r"a new conversation \(/reset in chat\)"):
        for q in QUESTIONS * 3:
            conv.ask(q, options(pipe))
    assert 1 <= len(conv.turns) < len(QUESTIONS) * 3
    conv.reset()
    assert conv.ask(QUESTIONS[0], options(pipe)).prompt_tokens < 120
    with pytest.raises(TgedgeError, match="a follow-up question may not hold <image>"):
        conv.ask("and <image> this?")
    with pytest.raises(TgedgeError, match="guide 'last': choose from latest, first"):
        Conversation(pipe, [image], "last")


# transformers' LLaVA-1.5 chat template (llava-hf), and a ChatML one with image items for the Qwen2 checkpoint
LLAVA_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
                  "{% endif %}{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}"
                  "{{ '<image>\n' }}{% endfor %}{% for item in message['content'] | selectattr('type', 'equalto', "
                  "'text') %}{{ item['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}"
                  "{{ 'ASSISTANT:' }}{% endif %}")
CHATML_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for item in message['content'] %}"
                   "{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
                   "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_plain_llava_turns_equal_transformers_generate(family, tmp_path):
    """A follow-up of a plain LLaVA checkpoint with its own chat template: the prompt as transformers' processor
    renders the conversation, and the tokens of transformers' generate on the whole conversation."""
    hf, processor = tiny.hf_llava(tmp_path, family)
    template = LLAVA_TEMPLATE if family == "llama" else CHATML_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text(template)
    processor.chat_template = template
    image = tiny.test_image(tmp_path / "image.png")
    model, ckpt = load_model(tmp_path)
    assert ckpt.preprocessor.spec.template.jinja == template
    pipe = TorchPipeline(model, ckpt.preprocessor)
    conv = Conversation(pipe, [image])
    messages = []
    for i, q in enumerate(QUESTIONS[:3]):
        messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text",
                                                                                                "text": q}]})
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        assert prompt == pipe.pre.spec.template.render_turns([*conv.turns, (q, None)], 1)
        turn = conv.ask(q, options(pipe))
        inputs = processor(images=Image.open(image), text=prompt, return_tensors="pt")
        with torch.no_grad():
            out = hf.generate(**inputs, max_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert turn.tokens == out[0, inputs["input_ids"].shape[1]:].tolist(), q
        assert turn.prompt_tokens == inputs["input_ids"].shape[1]
        if i:  # plain LLaVA: the image tokens do not depend on the question, the whole prefix is reused
            assert turn.reused_tokens >= previous
        previous = turn.prompt_tokens
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.text}]})
    assert len(set(turn.tokens)) > 1


def test_text_only_conversation():
    """No images (a served conversation sent without any): every follow-up reuses the whole previous turn."""
    pipe, other = open_pipeline("demo", None), open_pipeline("demo", None)
    conv = Conversation(pipe, [])
    for before, q in zip([None, *QUESTIONS], QUESTIONS[:3]):
        prompt = pipe.pre.spec.template.render_turns([*conv.turns, (q, None)], 0)
        turn = conv.ask(q, options(pipe))
        fresh = other.answer(None, prompt, options(other), raw=True)
        assert (turn.tokens, turn.prompt_tokens, turn.vision_cached) == (fresh.tokens, fresh.prompt_tokens, False)
        assert turn.reused_tokens >= (0 if before is None else previous)
        previous = turn.prompt_tokens
