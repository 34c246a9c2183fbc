"""tgedge bench --torch-device: the torch reference and transformers generate on a torch device (cuda: fp16), checked
before anything loads; the device reaches the targets, their pipelines and the floors. No GPU here: CUDA is faked
(torch.cuda.is_available) where a test needs it present, and nothing is run on it."""

import pytest
import torch

from tgedge.bench import Settings, Target, run_bench
from tgedge.cli import main
from tgedge.errors import TgedgeError


class Stop(TgedgeError):
    """Raised by a stand-in once it has seen what the test looks at (the bench goes no further)."""


def test_cuda_without_cuda_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = tmp_path / "r.json"
    assert main(["bench", "demo", "--torch-device", "cuda", "--json", str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "torch device cuda" in err and "sees no CUDA device" in err, err
    assert not report.exists()


def test_torch_device_without_a_torch_target_is_one_line(capsys):
    assert main(["bench", "demo", "--backend", "onnxruntime", "--torch-device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--torch-device is for torch's targets" in err, err


def test_torch_device_reaches_the_targets(demo_export, monkeypatch, capsys):
    """With CUDA (faked): the export stays on its backend; the torch reference and transformers go to cuda, named so."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = {}

    def fake_run_bench(targets, settings, progress=None):
        seen["targets"] = targets
        raise Stop("stop")

    monkeypatch.setattr("tgedge.bench.run_bench", fake_run_bench)
    assert main(["bench", str(demo_export.directory), "--compare", "torch,transformers", "--torch-device", "cuda",
                 "--transformers-model", "demo"]) == 2
    devices = {t.name: (t.kind, t.device) for t in seen["targets"]}
    assert devices == {demo_export.directory.name: ("tgedge", "cpu"),
                       "torch reference (cuda fp16)": ("torch", "cuda"),
                       "transformers generate (cuda fp16)": ("transformers", "cuda")}, devices


def test_target_opens_its_pipeline_on_its_device(monkeypatch):
    opened = []
    monkeypatch.setattr("tgedge.reference.TorchPipeline.from_checkpoint",
                        lambda path, clip, context, device: opened.append(("torch", device)))
    monkeypatch.setattr("tgedge.bench.peers.TransformersPeer",
                        lambda path, clip, device: opened.append(("transformers", device)))
    Target("ref", "demo", "torch", None, "torch", device="cuda").open()
    Target("hf", "demo", "torch", None, "transformers", device="cuda").open()
    Target("ref", "demo", "torch", None, "torch").open()
    assert opened == [("torch", "cuda"), ("transformers", "cuda"), ("torch", "cpu")]


def test_floors_are_the_gpus_when_torch_runs_there(monkeypatch):
    """A torch target on cuda (and no GPU backend): the floors are measured on the CUDA device."""
    class Peer:  # a target that times itself (the bench's peer protocol)
        def bench_run(self, settings):
            return {}

        def describe(self):
            return {"precision": "fp16", "cache": "-", "weight_bytes": 1, "kv_per_position": 1, "model": {}}

    devices = []

    def fake_peaks(device, threads=0):
        devices.append(device)
        raise Stop("stop")

    monkeypatch.setattr("tgedge.floors.measure_peaks", fake_peaks)
    for device in ("cuda", "cpu"):
        target = Target("ref", "demo", "torch", None, "torch", device=device)
        monkeypatch.setattr(target, "open", lambda text_only=False: Peer(), raising=False)
        with pytest.raises(Stop):
            run_bench([target], Settings(runs=1, warmup=0, prompt_tokens=(8,)))
    assert devices == ["cuda", "cpu"]
