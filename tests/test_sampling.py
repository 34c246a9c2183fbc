import numpy as np
import pytest

from tgedge.errors import TgedgeError
from tgedge.sampling import GenerationOptions, Sampler, StopCriteria


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    logits = np.random.RandomState(0).randn(50)
    assert Sampler(GenerationOptions()).pick(logits) == int(np.argmax(logits))
    assert Sampler(GenerationOptions(temperature=1.5, top_k=1, seed=3)).pick(logits) == int(np.argmax(logits))


def test_seeded_sampling_repeats_and_varies():
    logits = np.zeros(20)
    s = Sampler(GenerationOptions(temperature=1.0, seed=7))
    a = [s.pick(logits) for _ in range(30)]
    s = Sampler(GenerationOptions(temperature=1.0, seed=7))
    assert a == [s.pick(logits) for _ in range(30)] and len(set(a)) > 5


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05]))
    s = Sampler(GenerationOptions(temperature=1.0, top_p=0.8, seed=0))
    assert {s.pick(logits) for _ in range(200)} == {0, 1}


def test_stop_strings_and_eos():
    stop = StopCriteria(GenerationOptions(eos_token_ids=[9], stop_strings=["</s>"]),
                        decode=lambda ids: " ".join(map(str, ids)).replace("5", "</s>"))
    assert stop.done([1, 9]) and stop.done([1, 5]) and not stop.done([1, 2])
    assert stop.clean("red</s> blue") == "red"


@pytest.mark.parametrize("kw, msg", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                     ({"top_p": 0}, "top_p"), ({"temperature": float("nan")}, "temperature must be a finite"),
                                     ({"top_p": float("nan"), "seed": -1}, r"top_p must be in \(0, 1\] \(got nan\); seed")])
def test_bad_options(kw, msg):
    with pytest.raises(TgedgeError, match=msg):
        GenerationOptions(**kw)


@pytest.mark.parametrize("temperature", [1e-308, 5e-324, 1e-300, 1e-12])
def test_tiny_temperatures_are_greedy_not_nan(temperature):
    """In log space a temperature however small gives no inf - inf: as it goes to 0, sampling becomes greedy."""
    logits = np.random.RandomState(1).randn(64) * 30
    for top_k, top_p in ((0, 1.0), (5, 0.5), (0, 1e-300), (10 ** 30, 1.0)):
        s = Sampler(GenerationOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=2))
        assert {s.pick(logits) for _ in range(20)} == {int(np.argmax(logits))}


def test_huge_temperature_is_uniform_and_finite():
    s = Sampler(GenerationOptions(temperature=1e308, seed=0))
    assert len({s.pick(np.random.RandomState(2).randn(16) * 30) for _ in range(200)}) == 16
