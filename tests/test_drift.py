"""tgedge.drift: fp32 judged in units of the reference's own noise, by export's check and validate alike, and proven
both ways on weights with a trained model's statistics: a realistic tiny preset (tgedge.presets_init, outliers on)
passes, each planted defect (tgedge.defects) fails naming its stage."""

import pytest

from tgedge import presets
from tgedge.data import shapes
from tgedge.data.folder import write_folder
from tgedge.defects import DEFECTS, plant
from tgedge.drift import NOISE_FLOOR, noise_limit, noise_ratio, rel_l2
from tgedge.errors import TgedgeError
from tgedge.precision import REFERENCE
from tgedge.validate import STAGES, load_policy, validate

SAMPLES = 4


def test_units():
    assert rel_l2([1.0, 2.0], [1.0, 2.0]) == 0.0
    assert rel_l2([0.0, 1.0], [0.0, 0.0]) == 1.0 and rel_l2([1.0], [1.0, 2.0]) == float("inf")
    assert noise_ratio(8e-5, 1e-5) == pytest.approx(8.0)
    assert noise_ratio(4e-6, 1e-9) == pytest.approx(4e-6 / NOISE_FLOOR)  # a few ulps: floored
    assert noise_limit(1e-5, 8.0) == pytest.approx(8e-5) and noise_limit(0.0, 8.0) == 8 * NOISE_FLOOR


def test_export_and_validate_share_the_factor():
    """One definition: export's fp32 check and validate's default policy use the same number of noises."""
    policy = load_policy()
    judged = [s for s, limits in policy[REFERENCE.name].items() if "max_noise_ratio" in limits]
    assert set(judged) == {"text_guide", "vision", "fusion", "decoder"}
    assert all(policy[REFERENCE.name][s]["max_noise_ratio"] == REFERENCE.noise_factor for s in judged)
    assert all("max_rel" not in policy[REFERENCE.name][s] for s in judged)  # scale-dependent: reported only


@pytest.fixture(scope="module")
def realistic_export(tmp_path_factory):
    from tgedge.export.onnx_export import export_model

    root = tmp_path_factory.mktemp("drift")
    ckpt = root / "tg-tiny"
    presets.write_random("tg-tiny", ckpt, init="realistic")  # outliers on: the CLI's default
    result = export_model(ckpt, root / "fp32", clip=ckpt / "clip")
    data = write_folder(shapes.generate(shapes.SPLIT_SEEDS["eval"], SAMPLES), root / "data")
    return ckpt, result, data


def test_export_check_is_noise_relative(realistic_export):
    _, result, _ = realistic_export
    assert result.passed
    judged = [c for c in result.checks if c.noise is not None]
    assert {c.graph for c in judged} == {"text_guide", "vision", "fusion", "embed", "decoder"}
    for c in judged:
        assert c.limit == pytest.approx(noise_limit(c.noise, REFERENCE.noise_factor)) and c.rel_l2 <= c.limit


def test_realistic_fp32_passes(realistic_export):
    ckpt, result, data = realistic_export
    report = validate(result.directory, data, clip=ckpt / "clip", show_progress=False)
    assert report.passed, report.summary()
    for s in report.stages:
        if "max_noise_ratio" in s.limits:
            assert s.figures["noise_ratio"] < s.limits["max_noise_ratio"] and s.margins()["max_noise_ratio"] > 1


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_planted_defect_fails_naming_its_stage(defect, realistic_export, tmp_path):
    ckpt, result, data = realistic_export
    broken = tmp_path / defect
    plant(result.directory, broken, defect)
    report = validate(broken, data, reference=ckpt, clip=ckpt / "clip", show_progress=False)
    stage = DEFECTS[defect]
    assert report.first_failure.name == stage, report.summary()
    assert all(s.passed for s in report.stages if STAGES.index(s.name) < STAGES.index(stage))
    failed = next(s for s in report.stages if s.name == stage)
    assert any(b.startswith("noise_ratio") for b in failed.breaches), failed.breaches


def test_defects_refuse_what_they_cannot_plant(demo_export, tmp_path):
    with pytest.raises(TgedgeError, match="no q/k/v bias"):  # the demo's LLaMA decoder
        plant(demo_export.directory, tmp_path / "a", "qkv-bias")
    assert not (tmp_path / "a").exists()  # nothing half-written
    with pytest.raises(TgedgeError, match="unknown defect"):
        plant(demo_export.directory, tmp_path / "b", "typo")
    (tmp_path / "c").mkdir()
    with pytest.raises(TgedgeError, match="exists"):
        plant(demo_export.directory, tmp_path / "c", "decoder-mlp")
