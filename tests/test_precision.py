"""The precision table: one order, one policy section each, and inspect's recognition."""

import pytest

from tgedge.calibration.weight_only import WeightOnly
from tgedge.errors import TgedgeError
from tgedge.precision import PRECISIONS, REFERENCE, WEIGHT_ONLY, GraphEvidence, recognise
from tgedge.validate import load_policy


def test_table_is_in_rank_order_with_a_policy_section_each():
    assert [p.rank for p in PRECISIONS.values()] == list(range(len(PRECISIONS)))
    assert REFERENCE.rank == 0
    assert set(load_policy()) == set(PRECISIONS)


@pytest.mark.parametrize("evidence, name", [
    (GraphEvidence(False, frozenset(), frozenset({"float32"})), "fp32"),
    (GraphEvidence(False, frozenset(), frozenset()), "fp32"),  # no float weights at all (a Gather): the reference
    (GraphEvidence(False, frozenset(), frozenset({"float16", "float32"})), "fp16"),
    (GraphEvidence(True, frozenset(), frozenset({"float32"})), "int8"),
    (GraphEvidence(False, frozenset({8}), frozenset({"float32"})), "int8w"),
    (GraphEvidence(False, frozenset({4}), frozenset({"float16"})), "int4w"),  # an fp16 export's int4w decoder
])
def test_recognise(evidence, name):
    assert recognise(evidence).name == name


def test_weight_only_takes_a_weight_only_precision():
    assert [WeightOnly.of(p).bits for p in WEIGHT_ONLY] == [p.weight_bits for p in WEIGHT_ONLY]
    with pytest.raises(TgedgeError, match="fp32 is not a weight-only precision"):
        WeightOnly.of(REFERENCE)
