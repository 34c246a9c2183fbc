"""The stage contract, the KV cache object, the backend registry, and the import layering they keep."""

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tiny
from tgedge import demo_checkpoint
from tgedge.checkpoint import load_model
from tgedge.contract import FAMILIES, PAST, SEQ, StageContract, family_of
from tgedge.errors import TgedgeError
from tgedge.runtime.backends import BACKENDS, make_runner
from tgedge.runtime.cache import GrowingCache, make_cache
from tgedge.runtime.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_cfg():
    model, _ = load_model(demo_checkpoint())
    return model.cfg.to_dict()


def test_tg_contract_from_config(demo_cfg):
    c = StageContract.from_config(demo_cfg, 256)
    assert c.family == "tg" and c.stage_names == ("text_guide", "vision", "fusion", "embed", "decoder")
    assert c.stages["fusion"].input_names == ["image_features", "crop_features", "text_features", "text_pooled"]
    n = demo_cfg["vision"]["num_features"]
    assert c.stages["fusion"].outputs[0].shape[1] == n + demo_cfg["detail_perceiver"]["num_latents"]
    assert c.dims["num_views"]["opt"] == 5 and c.dims[SEQ]["max"] == 256
    layers = demo_cfg["decoder"]["num_layers"]
    dec = c.stages["decoder"]
    assert dec.input_names[3:] == c.cache.past_names() and len(c.cache.past_names()) == 2 * layers
    assert dec.output_names[1:] == c.cache.present_names()
    prefill, decode = c.stage_profiles("decoder")  # TensorRT profile 0 and 1
    assert prefill[PAST] == (0, 0, 0) and decode[SEQ] == (1, 1, 1) and decode[PAST][0] == 1
    assert [c.cache.profile_index(p) for p in (0, 1, 200)] == [0, 1, 1]
    # a feed's profile: cached positions = mask length - step length, whichever cache holds them
    feed = lambda t, total: {"inputs_embeds": np.zeros((1, t, 4)), "attention_mask": np.ones((1, total))}  # noqa
    assert [c.cache.profile_for(feed(t, total)) for t, total in ((7, 7), (1, 8), (1, 200), (3, 10))] == [0, 1, 1, 1]


def test_ablated_and_plain_models_are_the_plain_family(demo_cfg, tmp_path):
    no_tg = {**demo_cfg, "feature_mask": None, "detail_perceiver": None}
    c = StageContract.from_config(no_tg, 256)
    assert family_of(no_tg) is FAMILIES["plain"] and c.stage_names == ("vision", "fusion", "embed", "decoder")
    assert c.stages["fusion"].input_names == ["image_features"] and c.dims["num_views"]["opt"] == 1
    fom_only = {**demo_cfg, "detail_perceiver": None}
    assert StageContract.from_config(fom_only, 256).stages["fusion"].input_names == ["image_features", "text_pooled"]
    tiny.hf_llava(tmp_path / "hf", family="qwen2")
    model, _ = load_model(tmp_path / "hf")
    assert model.contract.family == "plain" and not model.contract.has("text_guide")


def test_model_stages_follow_the_contract(demo_cfg):
    import torch

    model, _ = load_model(demo_checkpoint())
    c = model.contract
    views = torch.zeros(5, 3, demo_cfg["vision"]["image_size"], demo_cfg["vision"]["image_size"])
    out = model.run_stage("vision", {"pixel_values": views})
    assert list(out) == c.stages["vision"].output_names
    assert tuple(out["image_features"].shape[1:]) == c.stages["vision"].outputs[0].shape[1:]


def test_manifest_records_the_contract_and_refuses_a_contradiction(demo_export, tmp_path):
    m = Manifest.load(demo_export.directory)
    derived = StageContract.from_config(m.model, m.max_context)
    assert m.contract.to_dict() == derived.to_dict() and m.contract.stages == derived.stages
    for name, entry in m.graphs.items():  # graph entries are the stages' tensors
        assert tuple(entry.inputs) == m.contract.stages[name].inputs
    broken = tmp_path / "broken"
    shutil.copytree(demo_export.directory, broken)
    raw = json.loads((broken / "manifest.json").read_text())
    raw["kv_cache"]["present_key_names"] = "new.%d.key"
    (broken / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(TgedgeError, match=r"kv_cache differ from what its model config gives"):
        Manifest.load(broken)
    raw["kv_cache"]["mode"] = "paged"
    (broken / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(TgedgeError, match=r"kv_cache mode 'paged' is not one this tgedge runs"):
        Manifest.load(broken)


def test_growing_cache_hands_present_back_as_past(demo_cfg):
    layout = StageContract.from_config(demo_cfg, 64).cache
    cache = make_cache(layout)
    assert isinstance(cache, GrowingCache)
    cache.reset(10)
    feed = cache.feed(3)
    assert cache.length == 0 and all(feed[n].shape[2] == 0 for n in layout.past_names())
    assert feed["attention_mask"].shape == (1, 3) and feed["position_ids"].tolist() == [[0, 1, 2]]
    present = {n: np.full((1, layout.num_kv_heads, 4, layout.head_dim), i, np.float32)
               for i, n in enumerate(layout.present_names())}
    cache.update(present, 4)
    assert cache.length == 4
    feed = cache.feed(1)
    assert all(feed[past] is present[pres] for past, pres in layout.present_for().items())
    assert feed["attention_mask"].shape == (1, 5) and feed["position_ids"].tolist() == [[4]]
    assert cache.keep == tuple(layout.present_names())
    with pytest.raises(TgedgeError, match=r"11 positions exceed the cache \(10\)"):
        cache.update(present, 7)


def test_backend_registry_is_the_one_list(demo_export):
    from tgedge.cli_common import BACKENDS as CLI_BACKENDS

    assert CLI_BACKENDS == ["torch", *BACKENDS]
    m = Manifest.load(demo_export.directory)
    with pytest.raises(TgedgeError, match=r"unknown backend 'tflite' \(choose from torch, onnxruntime, "):
        make_runner("tflite", m, "vision")
    with make_runner("onnxruntime", m, "vision") as runner:
        assert list(runner.get_input_metadata()) == m.contract.stages["vision"].input_names
    runner = make_runner("onnxruntime-cuda", m, "vision", threads=2, spin=False)  # loader options passed on
    assert (runner.loader.device, runner.loader.threads, runner.loader.spin) == ("cuda", 2, False)


# -- layering: no import loops, no import from a lower layer to a higher one -------------------------------------
PACKAGES = {"tgedge": ROOT / "tgedge", "tgedge.runtime": ROOT / "runtime", "tgedge.export": ROOT / "export",
            "tgedge.calibration": ROOT / "calibration"}
# A module may import only from its own layer and those below it (index: lower first).
LAYERS = [
    {"tgedge.errors", "tgedge.contract", "tgedge.precision", "tgedge.drift", "tgedge.fileio", "tgedge.config", "tgedge.prompt",
     "tgedge.sampling", "tgedge.preprocess", "tgedge.generate", "tgedge.stagecache", "tgedge.stageflow"},
    {"tgedge.runtime"},  # torch-free
    {"tgedge.model", "tgedge.layouts", "tgedge.checkpoint", "tgedge.reference", "tgedge.noise", "tgedge.pipelines",
     "tgedge.data", "tgedge.evaluate"},
    {"tgedge.validate", "tgedge.inspection", "tgedge.train_demo", "tgedge.demo", "tgedge.bench", "tgedge.device",
     "tgedge.presets", "tgedge.presets_init", "tgedge.model_stats"},
    {"tgedge.export", "tgedge.calibration", "tgedge.defects"},  # export's graph modules come from the model
    {"tgedge.cli", "tgedge.cli_chat", "tgedge.cli_common", "tgedge.cli_bench", "tgedge.cli_checkpoint",
     "tgedge.cli_deploy", "tgedge.cli_device", "tgedge.cli_serve", "tgedge.__main__"},  # no library module imports the CLI
]


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if name.count(".") >= 1 and name.split(".")[1] in ("runtime", "export", "calibration") \
                    and package == "tgedge":
                continue  # tgedge/runtime etc. do not exist: the packages map from top-level folders
            found[name] = path
    return found


def _imports(path: Path) -> set[str]:
    """Every import of a module, module level and inside functions (a lazy import is still a dependency)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in layer):
            return i
    return None


def test_no_import_loops_and_no_upward_imports():
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules} for m, p in modules.items()}
    upward = [f"{m} -> {i}" for m, deps in graph.items() for i in deps
              if _layer(m) is not None and _layer(i) is not None and _layer(i) > _layer(m)]
    assert not upward, upward
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError("import loop: " + " -> ".join(path + [m, d]))
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_runtime_imports_no_torch():
    for path in (ROOT / "runtime").glob("*.py"):
        assert not any(i == "torch" or i.startswith("torch.") for i in _imports(path)), path
