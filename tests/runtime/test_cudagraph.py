"""CUDA-graph decode (runtime/cudagraph.py) against a fake onnxruntime CUDA session: no GPU here. What is checked is
what a capture needs of the runtime: after the first decode step nothing is allocated or bound, every step replays
graph 1 over the same buffers (same addresses), its inputs written in place, the mask at its full fixed length; the
prefill runs uncaptured; the option is refused where it cannot work."""

import itertools

import numpy as np
import pytest

from tgedge.contract import CacheLayout
from tgedge.errors import TgedgeError
from tgedge.runtime.cache import StaticCache
from tgedge.runtime.onnxrt import OnnxRuntimeRunner, SessionFromOnnx, runner_for

ORT_TYPES = {np.float32: "tensor(float)", np.float16: "tensor(float16)", np.int64: "tensor(int64)"}
D, V, MAX = 8, 11, 32
LAYOUT = CacheLayout("static", num_layers=2, num_kv_heads=2, head_dim=4, max_length=MAX)


class FakeOrt:
    """The parts of onnxruntime the runner and the graph step use, counting allocations."""
    addresses = itertools.count(0x1000, 0x100)

    def __init__(self):
        self.allocations = 0
        ort = self

        class OrtValue:
            def __init__(self, array):
                self.array, self.address, self.writes = array, next(FakeOrt.addresses), 0

            @staticmethod
            def ortvalue_from_shape_and_type(shape, dtype, device, index):
                assert device == "cuda"
                ort.allocations += 1
                return OrtValue(np.zeros(shape, dtype))

            def data_ptr(self):
                return self.address

            def shape(self):
                return list(self.array.shape)

            def data_type(self):
                return ORT_TYPES[self.array.dtype.type]

            def update_inplace(self, array):
                assert array.shape == self.array.shape and array.dtype == self.array.dtype
                self.array[...] = array
                self.writes += 1

            def numpy(self):
                return self.array.copy()

        class RunOptions:
            def __init__(self):
                self.entries = {}

            def add_run_config_entry(self, key, value):
                self.entries[key] = value

        self.OrtValue, self.RunOptions = OrtValue, RunOptions


class Arg:
    def __init__(self, name, type_, shape):
        self.name, self.type, self.shape = name, type_, shape


class FakeBinding:
    def __init__(self, session):
        self.session, self.inputs, self.outputs, self.binds = session, {}, {}, 0

    def bind_ortvalue_input(self, name, value):
        self.inputs[name] = value
        self.binds += 1

    def bind_cpu_input(self, name, array):
        self.inputs[name] = array
        self.binds += 1

    def bind_ortvalue_output(self, name, value):
        self.outputs[name] = value
        self.binds += 1

    def bind_output(self, name, device):
        self.outputs[name] = None  # allocated by the run
        self.binds += 1

    def get_outputs(self):
        return list(self.outputs.values())


class FakeSession:
    """A decoder with a static cache: inputs_embeds, attention_mask, the pasts; logits and the presents."""

    def __init__(self, ort):
        self.ort, self.runs, self.bindings = ort, [], []

    def get_inputs(self):
        steps = [Arg("inputs_embeds", "tensor(float)", [1, "T", D]), Arg("attention_mask", "tensor(int64)", [1, "S"])]
        return steps + [Arg(n, "tensor(float)", [1, 2, "M", 4]) for n in LAYOUT.past_names()]

    def get_outputs(self):
        return [Arg("logits", "tensor(float)", [1, "T", V])] + [Arg(n, "tensor(float)", [1, 2, "M", 4])
                                                              for n in LAYOUT.present_names()]

    def io_binding(self):
        self.bindings.append(FakeBinding(self))
        return self.bindings[-1]

    def run_with_iobinding(self, io, options=None):
        embeds, mask = io.inputs["inputs_embeds"], io.inputs["attention_mask"]
        embeds = embeds.array if hasattr(embeds, "array") else embeds
        mask = mask.array if hasattr(mask, "array") else mask
        self.runs.append((io, dict(options.entries) if options else None, mask.copy()))
        logits = np.full((1, embeds.shape[1], V), float(mask.sum()), np.float32)  # the filled length, to check
        if io.outputs.get("logits") is None:
            io.outputs["logits"] = self.ort.OrtValue(logits)
        else:
            io.outputs["logits"].array[...] = logits


class FakeLoader:
    device, cuda_graph = "cuda", True

    def __init__(self, session):
        self.session = session

    def __call__(self):
        return self.session


@pytest.fixture
def fake(monkeypatch):
    import onnxruntime

    ort = FakeOrt()
    monkeypatch.setattr(onnxruntime, "OrtValue", ort.OrtValue)
    monkeypatch.setattr(onnxruntime, "RunOptions", ort.RunOptions)
    session = FakeSession(ort)
    runner = OnnxRuntimeRunner(FakeLoader(session), "decoder")
    runner.activate()
    yield ort, session, runner
    runner.deactivate()


def test_decode_steps_replay_one_graph_over_fixed_buffers(fake):
    ort, session, runner = fake
    cache = StaticCache(LAYOUT)
    cache.reset(20, runner)
    assert ort.allocations == 2 * LAYOUT.num_layers  # the cache's buffers, once
    rng = np.random.default_rng(0)

    def step(t):
        out = runner.infer({"inputs_embeds": rng.standard_normal((1, t, D), np.float32), **cache.feed(t)},
                           **cache.options)
        cache.update(out, t)
        return out

    prefill = step(5)
    assert session.runs[-1][1] == {"gpu_graph_id": "-1"}  # prefill: never captured
    assert prefill["logits"][0, -1, 0] == 5
    out = step(1)  # the first decode step makes the graph's binding: 3 buffers (embeddings, mask, logits)
    graph = runner.graph
    assert ort.allocations == 2 * LAYOUT.num_layers + 3
    io = session.runs[-1][0]
    bound = {**io.inputs, **io.outputs}
    addresses = {n: v.data_ptr() for n, v in bound.items()}
    binds = sum(b.binds for b in session.bindings)
    assert out["logits"][0, -1, 0] == 6
    for i in range(7):
        out = step(1)
        assert out["logits"][0, -1, 0] == 7 + i  # the mask's sum: the filled positions, the new one included
    decode_runs = session.runs[-8:]
    assert all(r[0] is io and r[1] == {"gpu_graph_id": "1"} for r in decode_runs)
    assert all(r[2].shape == (1, MAX) for r in decode_runs)  # the mask at its full length, every step
    assert ort.allocations == 2 * LAYOUT.num_layers + 3  # nothing allocated per step
    assert sum(b.binds for b in session.bindings) == binds  # nothing bound per step
    assert {n: v.data_ptr() for n, v in {**io.inputs, **io.outputs}.items()} == addresses
    assert all(io.inputs[p] is cache.buffers[p] for p in LAYOUT.past_names())  # the cache's own buffers
    assert all(io.outputs[LAYOUT.present_for()[p]] is cache.buffers[p] for p in LAYOUT.past_names())
    assert graph.embeds.writes == graph.mask.writes == 8 and graph.steps == 8
    # a new sequence, shorter: the mask's tail is cleared, the same graph replays
    cache.reset(20, runner)
    step(3)
    assert step(1)["logits"][0, -1, 0] == 4 and runner.graph is graph


def test_cuda_graphs_are_refused_where_they_cannot_work(tmp_path):
    with pytest.raises(TgedgeError, match="CUDA provider"):
        SessionFromOnnx(tmp_path / "decoder.onnx", "cpu", cuda_graph=True)

    class Manifest:
        class contract:
            class cache:
                mode = "static-onnx"

        @staticmethod
        def graph_path(graph):
            return tmp_path / f"{graph}.onnx"

    with pytest.raises(TgedgeError, match="--cache static"):
        runner_for(Manifest, "decoder", "cuda", cuda_graph=True)
    assert runner_for(Manifest, "embed", "cuda", cuda_graph=True).loader.cuda_graph is False  # the decoder's alone
    Manifest.contract.cache.mode = "static"
    assert runner_for(Manifest, "decoder", "cuda", cuda_graph=True).loader.cuda_graph is True


def test_the_session_asks_for_cuda_graphs(monkeypatch, tmp_path):
    import onnxruntime

    seen = {}
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda source, so, providers: seen.setdefault("p", providers))
    SessionFromOnnx(tmp_path / "decoder.onnx", "cuda", cuda_graph=True)()
    assert seen["p"][0] == ("CUDAExecutionProvider", {"enable_cuda_graph": "1"})
    seen.clear()
    SessionFromOnnx(tmp_path / "decoder.onnx", "cuda")()  # the flag off: the provider as before
    assert seen["p"][0] == "CUDAExecutionProvider"
