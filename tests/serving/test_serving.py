"""Serving on Triton Inference Server: the repository's configs against Triton's own schema, and the real
`tritonserver` (nvidia-pytriton's) on the demo exported with a static KV cache, so the entry model decodes through
its scheduler (in-flight batching; the per-request path: tests/serving/test_entry.py): answers equal the
single-process Pipeline's with 8 concurrent streaming clients, bad requests beside them fail alone, a killed client
does not wedge it, malformed requests get error responses, the CLI commands (client, loadtest, serve) behave. One
server for the module, on free loopback ports, always stopped."""

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tgedge.cli import main
from tgedge.data.folder import read_folder
from tgedge.fileio import check_output
from tgedge.errors import TgedgeError
from tgedge.runtime.manifest import Manifest

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install 'tgedge[serve]')")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from tgedge.serving import repository  # noqa: E402
from tgedge.serving.client import Session, request_inputs  # noqa: E402
from tgedge.serving.protocol import ENTRY_MODEL, REQUEST  # noqa: E402
from tgedge.serving.server import TritonServer, find_tritonserver, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 20


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo exported with a static KV cache: the export the entry model batches requests of."""
    from tgedge.export.onnx_export import export_model

    return export_model("demo", tmp_path_factory.mktemp("served") / "demo", cache_mode="static",
                        check=False).directory


@pytest.fixture(scope="module")
def repo(served, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    repository.write_repository(served, out, repository.RepositorySettings(max_batch=8))
    return out


def _runnable_tritonserver() -> None:
    """Skip (saying why) where no tritonserver can run here; a server that runs but fails is a failure."""
    try:
        install = find_tritonserver()
    except TgedgeError as e:
        pytest.skip(f"no tritonserver here: {e}")
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(map(str, install.libs)))
    try:
        probe = subprocess.run([str(install.binary), "--help"], env=env, capture_output=True, timeout=60)
    except OSError as e:
        pytest.skip(f"{install.binary} cannot run on this machine ({e.strerror})")
    if probe.returncode == 127 or b"error while loading shared libraries" in probe.stderr:
        pytest.skip(f"{install.binary} cannot run on this machine: {probe.stderr.decode(errors='replace')[:200]}")


@pytest.fixture(scope="module")
def server(repo):
    _runnable_tritonserver()
    server = TritonServer(repo)
    server.start(timeout=240)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def samples(demo_eval):
    return [(r.image, r.prompt, r.image.read_bytes()) for r in read_folder(demo_eval)[:SAMPLES]]


@pytest.fixture(scope="module")
def reference(served, samples):
    """Greedy answers of the single-process runtime, as `tgedge run` gives them."""
    from tgedge.runtime.pipeline import Pipeline

    with Pipeline(served) as pipe:
        return [pipe.answer(path, prompt, pipe.options(max_new_tokens=64)).to_dict() for path, prompt, _ in samples]


# -- the repository -------------------------------------------------------------------------------------------
def _fake_engines(export: Path, out: Path) -> Path:
    """An engine directory as tgedge build writes one (engines listed in the manifest), with placeholder plans."""
    shutil.copytree(export, out)
    d = json.loads((out / "manifest.json").read_text())
    d["engines"] = {g: {"file": f"{g}.engine", "backend": "tensorrt"} for g in d["graphs"]}
    for g in d["graphs"]:
        (out / f"{g}.engine").write_bytes(b"plan " + g.encode())
    (out / "manifest.json").write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("backend", ["python", "onnxruntime", "tensorrt"])
def test_every_config_parses_with_tritons_schema(backend, demo_export, tmp_path):
    source = _fake_engines(demo_export.directory, tmp_path / "engines") if backend == "tensorrt" \
        else demo_export.directory
    out = tmp_path / "repo"
    result = repository.write_repository(source, out, repository.RepositorySettings(backend, instances=2))
    contract = Manifest.load(demo_export.directory).contract
    configs = {p.parent.name: parse(p) for p in out.glob("*/config.pbtxt")}
    assert set(configs) == {ENTRY_MODEL, *contract.stage_names} == set(result.models)
    graph = {"python": "model.onnx", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}[backend]
    for stage in contract.stage_names:
        c, s = configs[stage], contract.stages[stage]
        assert [t.name for t in c.input] == s.input_names and [t.name for t in c.output] == s.output_names
        first = s.inputs[0]
        assert [list(t.dims) for t in c.input] == [[d if isinstance(d, int) else -1 for d in t.shape[1:]]
                                                   for t in s.inputs]
        wanted = 8 * 5 if first.shape[0] == "num_views" else 8
        assert c.max_batch_size == (min(wanted, contract.dims[first.shape[0]]["max"]) if backend == "tensorrt"
                                    else wanted)
        assert c.HasField("dynamic_batching") == (stage in ("text_guide", "vision"))
        assert c.instance_group[0].count == 2
        assert (out / stage / "1" / graph).is_file()
        plan = out / stage / "1" / graph
        assert plan.stat().st_ino == (out / ENTRY_MODEL / "1" / "export" / (
            f"{stage}.engine" if backend == "tensorrt" else f"{stage}.onnx")).stat().st_ino  # one copy on disk
        if backend == "python":
            assert c.backend == "python" and (out / stage / "1" / "model.py").is_file()
        else:
            assert c.platform == {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[backend]
    if backend == "tensorrt":
        assert list(configs["decoder"].instance_group[0].profile) == ["0", "1"]
        assert configs["vision"].max_batch_size == 5  # what the engine's profile allows
        assert any("vision" in n for n in result.notes)
    entry = configs[ENTRY_MODEL]
    assert entry.model_transaction_policy.decoupled and entry.backend == "python"
    assert [t.name for t in entry.input] == [f.name for f in REQUEST]
    assert [t.name for t in entry.input if t.optional] == [f.name for f in REQUEST if f.optional]
    assert Manifest.load(out / ENTRY_MODEL / "1" / "export").contract.stage_names == contract.stage_names


def test_triton_refuses(demo_export, tmp_path, capsys):
    code, _, err = run(capsys, "triton", demo_export.directory, "-o", tmp_path / "r", "--backend", "tensorrt")
    assert code == 2 and "needs an engine directory" in err and len(err.strip().splitlines()) == 1
    engines = _fake_engines(demo_export.directory, tmp_path / "rtx")
    d = json.loads((engines / "manifest.json").read_text())
    d["engines"]["vision"]["backend"] = "tensorrt_rtx"
    (engines / "manifest.json").write_text(json.dumps(d))
    code, _, err = run(capsys, "triton", engines, "-o", tmp_path / "r", "--backend", "tensorrt")
    assert code == 2 and "tensorrt_rtx" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "triton", demo_export.directory, "-o", tmp_path / "busy")
    assert code == 2 and "not a tgedge output" in err and (tmp_path / "busy" / "notes.txt").exists()
    code, out, _ = run(capsys, "triton", demo_export.directory, "-o", tmp_path / "ok", "--instances", "2")
    assert code == 0 and "vision" in out and (tmp_path / "ok" / "tgedge" / "config.pbtxt").exists()
    code, _, err = run(capsys, "triton", demo_export.directory, "-o", tmp_path / "ok", "--instances", "0")
    assert code == 2 and "--instances" in err


def test_triton_says_how_the_entry_decodes(served, demo_export, tmp_path, capsys):
    # the decoder's intra-op threads: the cores where one thread steps the scheduler, else --threads
    for source, extra, says, threads in (
            (served, [], "in-flight batching: one scheduler of 8 slots", "0"),
            (served, ["--decoder-threads", "3"], "(the decoder on 3 threads)", "3"),
            (served, ["--max-inflight", "1", "--threads", "2"], "at most 1 at once (max_inflight is 1)", "2"),
            (demo_export.directory, [], "on its own, at most 8 at once (batched decoding needs a static KV cache; "
                                        "this export's is 'growing'", "1")):
        code, out, err = run(capsys, "triton", source, "-o", tmp_path / "r", "--force", *extra)
        assert code == 0 and says in out, out + err
        assert parse(tmp_path / "r" / ENTRY_MODEL / "config.pbtxt").parameters["decoder_threads"].string_value \
            == threads
    engines = _fake_engines(served, tmp_path / "engines")  # a static cache, engines of one sequence
    result = repository.write_repository(engines, tmp_path / "trt", repository.RepositorySettings("tensorrt"))
    assert "on its own, at most 1 at once (the decoder engine holds one sequence: tgedge build --max-batch N" \
        in result.models[ENTRY_MODEL]
    d = json.loads((engines / "manifest.json").read_text())  # built with --max-batch 4
    for engine in d["engines"].values():
        engine["max_batch"] = 4
    (engines / "manifest.json").write_text(json.dumps(d))
    result = repository.write_repository(engines, tmp_path / "trt4", repository.RepositorySettings("tensorrt"))
    assert "in-flight batching: one scheduler of 4 slots" in result.models[ENTRY_MODEL]
    configs = {p.parent.name: parse(p) for p in (tmp_path / "trt4").glob("*/config.pbtxt")}
    assert configs[ENTRY_MODEL].parameters["max_inflight"].string_value == "4"  # the engine's most, not 8
    assert configs["vision"].max_batch_size == 4 * 5  # four images' views


def test_server_side_modules_import_no_torch():
    """entry and stage run inside tritonserver's Python: the torch-free runtime and below, nothing heavier."""
    for name in ("entry", "stage", "protocol", "repository"):
        tree = ast.parse((ROOT / "tgedge" / "serving" / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        heavy = {m for m in imported if m.split(".")[0] == "torch" or m.startswith(("tgedge.model", "tgedge.export",
                                                                                   "tgedge.reference"))}
        assert not heavy, (name, heavy)


# -- the real server ------------------------------------------------------------------------------------------
def _ask_all(url, samples, workers, **options):
    """Every sample answered by `workers` concurrent streaming clients (one stream each)."""
    local = threading.local()
    sessions = []

    def ask(sample):
        if not hasattr(local, "session"):
            local.session = Session(url, timeout=60)
            sessions.append(local.session)
        pieces = []
        reply = local.session.ask(sample[2], sample[1], on_text=pieces.append, **options)
        return reply, "".join(pieces)

    try:
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(ask, samples))
    finally:
        for s in sessions:
            s.close()


def test_answers_equal_pipeline_with_8_streaming_clients(server, samples, reference):
    assert any("in-flight batching, one scheduler of 8 slots" in line for line in server.log)
    replies = _ask_all(server.grpc_url, samples, 8, max_new_tokens=64)
    for (reply, streamed), want in zip(replies, reference):
        got = reply.answer
        assert (got["tokens"], got["text"], got["prompt_tokens"]) == (want["tokens"], want["text"],
                                                                      want["prompt_tokens"])
        assert streamed.strip() == got["text"] and reply.first_text_s is not None
        assert set(got) == set(want) and set(got["timings"]) >= set(want["timings"])


def test_bad_requests_beside_good_ones_fail_alone(server, samples, reference, served):
    """An unreadable image and a prompt beyond the context, sent among good requests: their own one-line errors;
    the good ones' tokens unchanged."""
    context = Manifest.load(served).max_context
    bad = [(samples[0][0], samples[0][1], b"not an image"), (samples[1][0], "why " * context, samples[1][2])]
    mixed = samples[:4] + bad + samples[4:8]
    sessions = [Session(server.grpc_url, timeout=60) for _ in mixed]  # all at once: one stream each

    def ask(session, sample):
        try:
            return session.ask(sample[2], sample[1], max_new_tokens=64).answer["tokens"]
        except TgedgeError as e:
            return str(e)

    try:
        with ThreadPoolExecutor(len(mixed)) as pool:
            got = list(pool.map(ask, sessions, mixed))
    finally:
        for s in sessions:
            s.close()
    assert got[:4] + got[6:] == [r["tokens"] for r in reference[:8]]
    assert "unreadable image" in got[4] and "longer than the context" in got[5], got[4:6]


KILLED_CLIENT = """
import sys, time
import tritonclient.grpc as grpcclient
from tgedge.serving.client import request_inputs
import threading
answering = threading.Event()
client = grpcclient.InferenceServerClient(sys.argv[1])
client.start_stream(callback=lambda result, error: answering.set())
image = open(sys.argv[2], "rb").read()
for i in range(24):
    # sampled at a high temperature the demo model rambles on: long answers, in flight when this process dies
    options = dict(max_new_tokens=160, temperature=1000.0, seed=i)
    client.async_stream_infer("tgedge", request_inputs(image, sys.argv[3], **options), request_id=str(i))
answering.wait(60)  # the server has the requests and is streaming answers
print("answering", flush=True)
time.sleep(120)
"""


def test_killed_client_does_not_wedge_the_server(server, samples, reference):
    path, prompt, _ = samples[0]
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.grpc_url, str(path), prompt],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "answering"
    finally:
        client.kill()  # SIGKILL with 24 long answers under way: its stream drops mid-answer
        client.wait(30)
    replies = _ask_all(server.grpc_url, samples[:8], 8, max_new_tokens=64)  # every decoding slot free again
    assert [r.answer["tokens"] for r, _ in replies] == [w["tokens"] for w in reference[:8]]
    assert server.running and server.ready()
    # decoding stopped when the client went; its queued requests may reach a slot (and be cancelled) after ours
    deadline = time.monotonic() + 60
    while not any("request cancelled" in line for line in server.log) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any("request cancelled" in line for line in server.log)
    assert not [line for line in server.log if "internal error" in line]


def _raw_request(url, inputs):
    """Send tensors as given (no client-side checks); the error message, or None if it was answered."""
    import tritonclient.grpc as grpcclient

    errors, done = [], threading.Event()
    client = grpcclient.InferenceServerClient(url)

    def callback(result, error):
        if error is not None:
            errors.append(str(error))
            done.set()
        elif result.get_response().parameters["triton_final_response"].bool_param:
            done.set()

    client.start_stream(callback=callback)
    try:
        client.async_stream_infer(ENTRY_MODEL, inputs, enable_empty_final_response=True)
        assert done.wait(60), "no response"
    finally:
        client.stop_stream()
        client.close()
    return errors[0] if errors else None


def _tensor(name, value, datatype):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(value.shape), datatype)
    t.set_data_from_numpy(value)
    return t


def test_out_of_range_requests_are_one_line_errors(server, samples, served):
    """Sent raw (no client-side checks): integers beyond their bounds arrive whole (int64 fields) and are refused
    naming the input and its bound; an empty image; token ids outside a stage's vocabulary, never a stack trace."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url = server.grpc_url
    _, prompt, image = samples[0]
    question = _tensor("question", np.array([prompt.encode()], dtype=np.object_), "BYTES")
    base = [_tensor("image", np.frombuffer(image, np.uint8), "UINT8"), question]
    for name, value, message in (
            ("max_new_tokens", 2 ** 32 + 1,
             "input 'max_new_tokens' must be an integer in [1, 2147483647] (got 4294967297)"),
            ("top_k", 2 ** 32, "input 'top_k' must be an integer in [0, 2147483647] (got 4294967296)"),
            ("seed", -1, "input 'seed' must be an integer in [0, 4294967295] (got -1)")):
        error = _raw_request(url, [*base, _tensor(name, np.array([value], np.int64), "INT64")])
        assert error and message in error, error
    error = _raw_request(url, [_tensor("image", np.zeros(0, np.uint8), "UINT8"), question])
    assert error and "input 'image' is empty" in error, error
    model = Manifest.load(served).model
    client = grpcclient.InferenceServerClient(url)
    guide = model["text_guide"]["max_position_embeddings"]  # the guide's fixed token length
    for stage, ids, message in (
            ("text_guide", np.full((1, guide), model["text_guide"]["vocab_size"], np.int64),
             f"text_guide: input 'input_ids' must hold token ids in [0, {model['text_guide']['vocab_size'] - 1}]"),
            ("embed", np.array([[1, -1, 2]], np.int64), "embed: input 'input_ids' must hold token ids in [0, ")):
        with pytest.raises(InferenceServerException) as info:
            client.infer(stage, [_tensor("input_ids", ids, "INT64")])
        assert message in str(info.value) and "Traceback" not in str(info.value), str(info.value)
    assert _raw_request(url, base) is None  # and it still answers


def test_malformed_requests_get_error_responses(server, samples, reference):
    url = server.grpc_url
    _, prompt, image = samples[0]
    with Session(url, timeout=60) as session:
        assert session.guided  # the demo is a TG model: its entry config names text_guide (raw needs a guide, below)
        for args, options, message in (((b"not an image", prompt), {}, "unreadable image"),
                                       ((image, "   "), {}, "empty prompt"),
                                       ((image, prompt), {"raw": True}, "needs --guide"),
                                       ((image, prompt), {"raw": True, "guide": prompt}, "<image> exactly once"),
                                       ((image, prompt), {"temperature": -1.0}, "temperature must be")):
            with pytest.raises(TgedgeError, match=message):
                session.ask(*args, **options)
        text = np.array([prompt.encode()], dtype=np.object_)
        pixels = np.frombuffer(image, np.uint8)
        assert "question" in _raw_request(url, [_tensor("image", pixels, "UINT8")])  # a required input missing
        assert _raw_request(url, [_tensor("image", pixels, "UINT8"),
                                  _tensor("question", np.zeros(1, np.float32), "FP32")])  # wrong type
        assert "Expected [1]" in _raw_request(url, [_tensor("image", pixels, "UINT8"),
                                                    _tensor("question", np.repeat(text, 2), "BYTES")])
        assert "UTF-8" in _raw_request(url, [_tensor("image", pixels, "UINT8"),
                                             _tensor("question", np.array([b"\xff\xfe"], np.object_), "BYTES")])
        assert session.ask(image, prompt).answer["tokens"] == reference[0]["tokens"]  # and it still answers
    assert server.running


def test_client_cli_prints_what_run_prints(server, served, samples, capsys, tmp_path):
    path, prompt, _ = samples[1]
    code, out, _ = run(capsys, "client", server.grpc_url, "--image", path, "--prompt", prompt, "--json")
    assert code == 0
    got = json.loads(out)
    code, out, _ = run(capsys, "run", served, "--image", path, "--prompt", prompt, "--json")
    want = json.loads(out)
    assert set(got) == set(want) and (got["tokens"], got["text"]) == (want["tokens"], want["text"])
    code, out, _ = run(capsys, "client", f"grpc://{server.grpc_url}", "--image", path, "--prompt", prompt, "--stream")
    assert code == 0 and out.strip() == want["text"]
    raw = ["--prompt", f"USER: <image>\n{prompt} ASSISTANT:", "--raw", "--guide", prompt, "--json"]
    code, out, _ = run(capsys, "client", server.grpc_url, "--image", path, *raw)
    code2, out2, _ = run(capsys, "run", served, "--image", path, *raw)
    assert code == code2 == 0 and json.loads(out)["tokens"] == json.loads(out2)["tokens"]
    from tgedge.runtime.pipeline import Pipeline

    with Pipeline(served) as pipe:
        text_only = pipe.answer(None, prompt, pipe.options(max_new_tokens=64)).to_dict()
    code, out, _ = run(capsys, "client", server.grpc_url, "--no-image", "--prompt", prompt, "--json")
    got = json.loads(out)
    assert code == 0 and (got["tokens"], got["prompt_tokens"]) == (text_only["tokens"], text_only["prompt_tokens"])
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    for argv, message in ((["client", server.grpc_url, "--image", bad], "unreadable image"),
                          (["client", server.grpc_url, "--image", tmp_path / "none.png"], "none.png"),
                          (["client", f"127.0.0.1:{free_port()}", "--image", path, "--timeout", "5"],
                           "no Triton server answers"),
                          (["client", server.grpc_url, "--image", path, "--model", "nope"], "not ready"),
                          (["client", server.http_url, "--image", path], "gRPC"),
                          (["client", server.grpc_url], "give --image FILE, or --no-image"),
                          (["client", server.grpc_url, "--image", path, "--no-image"], "(not both)"),
                          (["client", server.grpc_url, "--image", path, "--conversation-guide", "first"],
                           "--conversation-guide is for a --conversation's turns"),
                          (["client", server.grpc_url, "--conversation", "c", "--raw"], "no --raw, no --guide")):
        code, out, err = run(capsys, *argv, "--prompt", prompt)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_client_conversation_with_two_images(server, served, samples, capsys):
    """A conversation through the real server: its first turn sends two images, follow-ups none; every turn equal to
    the Conversation API's on the export, the KV cache reused (guide first: the whole previous turn)."""
    from tgedge.conversation import Conversation
    from tgedge.runtime.pipeline import Pipeline

    (a, question, _), (b, _, _) = samples[:2]
    questions = [question, "how many shapes are there?", "is there a red square?"]
    with Pipeline(served) as pipe:
        conv = Conversation(pipe, [a, b], "first")
        want = [conv.ask(q, pipe.options(max_new_tokens=12)) for q in questions]
        conv.close()
    for i, q in enumerate(questions):
        images = ["--image", a, "--image", b] if i == 0 else []
        code, out, err = run(capsys, "client", server.grpc_url, *images, "--prompt", q, "--conversation", "two-images",
                             "--conversation-guide", "first", "--max-new-tokens", 12, "--json")
        assert code == 0, err
        got = json.loads(out)
        assert (got["tokens"], got["prompt_tokens"], got["reused_tokens"]) == (
            want[i].tokens, want[i].prompt_tokens, want[i].reused_tokens)
        assert (got["conversation"], got["turn"], got["recomputed"]) == ("two-images", i + 1, False)
    assert want[2].reused_tokens >= want[1].prompt_tokens > 0


def test_loadtest(server, repo, demo_eval, capsys, tmp_path):
    report, png = tmp_path / "load.json", tmp_path / "load.png"
    code, out, err = run(capsys, "loadtest", server.grpc_url, "--data", demo_eval, "--concurrency", "1,2",
                         "--requests", "6", "--baseline", repo, "--json", report, "--plot", png)
    assert code == 0, err
    d = json.loads(report.read_text())
    assert [lv["concurrency"] for lv in d["levels"]] == [1, 2] and len(d["baselines"]) == 1 and d["image"]
    _check_levels(d, 6)
    assert png.read_bytes()[:4] == b"\x89PNG" and "req/s" in out and "itl p50" in out
    # the decoder alone at batch B = each level's concurrency, on the baseline's export, beside what was served
    # on the threads the repository gives its batching decoder (decoder_threads 0: ONNX Runtime's default)
    assert [lv["batch"] for lv in d["decoder"]["levels"]] == [1, 2] and d["decoder"]["threads"] == 0
    assert d["decoder"]["prompt_tokens"] == d["baselines"][0]["prompt_tokens"] > 0
    for lv, dec in zip(d["levels"], d["decoder"]["levels"]):
        assert lv["decoder_tokens_per_s"] == dec["tokens_per_s"] > 0 and dec["rows_agree"]
        assert lv["served_of_decoder"] == pytest.approx(lv["tokens_per_s"] / dec["tokens_per_s"], abs=1e-3)
        decoding = lv["concurrency"] * 1000 / lv["inter_token_ms"]["mean"]  # the decode share: streams / ITL
        assert lv["decode_tokens_per_s"] == pytest.approx(decoding, rel=1e-3)
        assert lv["decode_of_decoder"] == pytest.approx(decoding / dec["tokens_per_s"], rel=1e-2)
    assert "decoder alone at batch B" in out
    # text-only requests: the questions alone, answered as the single-process loop answers them without images
    code, out, err = run(capsys, "loadtest", server.grpc_url, "--data", demo_eval, "--concurrency", "3",
                         "--requests", "4", "--no-image", "--max-new-tokens", "8", "--baseline", repo, "--json",
                         report)
    assert code == 0, err
    d = json.loads(report.read_text())
    assert not d["image"] and d["options"]["max_new_tokens"] == 8
    _check_levels(d, 4)
    assert all(lv["generated_tokens"] <= 8 * 4 for lv in d["levels"])


def _check_levels(d, requests):
    """Every level's keys, and counts that add up: all answered, each equal to the baseline's."""
    base = d["baselines"][0]
    for lv in d["levels"]:
        assert lv["errors"] == 0 and lv["requests"] == requests == lv["answered"] + lv["errors"]
        assert lv["matches"] == requests and lv["generated_tokens"] == base["generated_tokens"] > 0
        for key in ("latency_ms", "ttft_ms", "inter_token_ms"):
            assert set(lv[key]) == {"p50", "p90", "p99", "mean"}, key
        assert lv["requests_per_s"] > 0 and lv["tokens_per_s"] > 0


def test_loadtest_skips_the_decoder_rate_of_an_export_that_cannot_batch(demo_export):
    from tgedge.serving.loadtest import Level, Report, decoder_rates

    report = Report("127.0.0.1:1", 1, 1, {})
    report.baselines.append(Level("loop", 1, 1, 0, 1.0, 1.0, 2.0, {}, {}, {}, 1, 2, 91))
    report.levels.append(Level("triton", 4, 1, 0, 1.0, 1.0, 2.0, {}, {}, {}, 1, 2, 91))
    decoder_rates(report, demo_export.directory, 1)
    assert report.decoder == {"skipped": f"{demo_export.directory}: batched decoding needs a static KV cache; this "
                                         "export's is 'growing': export with --cache static (onnxruntime) or --cache "
                                         "static-onnx"}
    assert report.levels[0].decoder_tokens_per_s is None


def test_loadtest_refuses(demo_eval, capsys):
    for argv, message in ((["10.1.2.3:8001"], "only loads a server on this machine"),
                          (["grpc://0.0.0.0:8001"], "only loads a server on this machine"),
                          (["127.0.0.1:1", "--concurrency", "0,4"], "--concurrency"),
                          (["127.0.0.1:1", "--requests", "0"], "--requests")):
        code, _, err = run(capsys, "loadtest", *argv, "--data", demo_eval)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


class _FakeTriton:
    """A Triton gRPC client whose server serves an entry model with these BLS stages; records what is sent."""

    def __init__(self, stages: str):
        self.stages, self.sent = stages, []

    def is_server_live(self, **_):
        return True

    def is_model_ready(self, *_, **__):
        return True

    def get_model_config(self, *_, **__):
        return {"config": {"name": ENTRY_MODEL, "parameters": {"bls_stages": {"string_value": self.stages}}}}

    def start_stream(self, **_):
        self.sent.append("stream")

    def async_stream_infer(self, *_, **__):
        from tritonclient.utils import InferenceServerException

        self.sent.append("infer")
        raise InferenceServerException("the server got it")

    def stop_stream(self, **_):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("stages, refused", [("text_guide,vision", True), ("vision", False)], ids=["tg", "plain"])
def test_client_raw_without_guide_refused_before_sending(stages, refused, tmp_path, capsys, monkeypatch):
    """--raw without --guide on a TG entry model (its config calls text_guide): the client's own one line, exit 2,
    nothing sent (probe 3: only the server caught it); the same message as the server's. A model without a text
    guide takes --raw alone: the request goes out."""
    import tritonclient.grpc

    from tgedge.preprocess import RAW_NEEDS_GUIDE

    fake = _FakeTriton(stages)
    monkeypatch.setattr(tritonclient.grpc, "InferenceServerClient", lambda url: fake)
    image = tmp_path / "i.png"
    image.write_bytes(b"png")
    argv = ["client", "127.0.0.1:8001", "--image", image, "--raw", "--prompt", "<image> what color?"]
    code, _, err = run(capsys, *argv)
    said = RAW_NEEDS_GUIDE if refused else "the server got it"
    assert code == 2 and err.strip() == f"tgedge: error: 127.0.0.1:8001: {said}", err
    assert fake.sent == ([] if refused else ["stream", "infer"])


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 0), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_serve_cli_stops_cleanly(repo, sig, code):
    """Ctrl-C stops the server (exit 0), SIGTERM too (143, docs/ERRORS.md); its processes go with it, and the
    repository stays tgedge triton's output (`tgedge triton -o` may replace it, the stubs' __pycache__ beside model.py
    notwithstanding)."""
    _runnable_tritonserver()
    ports = [str(free_port()) for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "tgedge", "serve", str(repo), "--quiet", "--http-port", ports[0],
                             "--grpc-port", ports[1], "--metrics-port", ports[2]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ready: grpc"), line + proc.stderr.read()
        server_pids = subprocess.run(["pgrep", "-g", str(_server_group(proc.pid))], capture_output=True,
                                     text=True).stdout.split()
        assert len(server_pids) >= 1 + 6  # tritonserver and a stub per model instance
        proc.send_signal(sig)
        assert proc.wait(60) == code
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in server_pids):
            time.sleep(0.2)
        assert not [p for p in server_pids if Path(f"/proc/{p}").exists()], "server processes left behind"
        assert check_output(repo, kind="repository")  # the stubs' __pycache__ does not make it foreign
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _server_group(parent: int) -> int:
    """The process group of `tgedge serve`'s tritonserver (its own session)."""
    children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    assert children, "tgedge serve has no child"
    return os.getpgid(int(children[0]))


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "serve", tmp_path / "nothing")
    assert code == 2 and "model repository not found" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "serve", tmp_path / "empty")
    assert code == 2 and "no model" in err
    code, _, err = run(capsys, "serve", tmp_path / "empty", "--http-port", "8000", "--grpc-port", "8000")
    assert code == 2 and "must differ" in err
    _runnable_tritonserver()
    broken = tmp_path / "broken" / "oops"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "python"\nmax_batch_size: 0\n'
                                         'input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]\n'
                                         'output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]\n')
    (broken / "1" / "model.py").write_text("raise RuntimeError('this model cannot load')\n")
    ports = [str(free_port()) for _ in range(3)]
    code, _, err = run(capsys, "serve", broken.parent, "--quiet", "--timeout", "120", "--http-port", ports[0],
                       "--grpc-port", ports[1], "--metrics-port", ports[2])
    assert code == 2 and "this model cannot load" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("options, message", [
    ({"max_new_tokens": 2 ** 31}, r"option max_new_tokens must be an integer in \[1, 2147483647\] \(got 2147483648\)"),
    ({"top_k": -2 ** 31 - 1}, r"option top_k must be an integer in \[0, 2147483647\] \(got -2147483649\)"),
    ({"seed": 2 ** 64}, r"option seed: 18446744073709551616 does not fit the request's int64 field"),
    ({"max_new_tokens": True}, "option max_new_tokens: True does not fit"),
    ({"temperature": float("nan")}, "option temperature: nan is not a finite number"),
])
def test_request_fields_are_range_checked_not_wrapped(options, message):
    """numpy would wrap 2^31 into int32 (-2^31): the request refuses it instead."""
    with pytest.raises(TgedgeError, match=message):
        request_inputs(b"image", "what color?", **options)


@pytest.mark.parametrize("tied", [True, False])
def test_an_export_with_external_weights_loads_from_its_repository(tied, tg_tiny, tmp_path):
    """The case the demo (inline weights) misses: every graph's weights in external files; tied (tg-tiny, Qwen2:
    the decoder's LM head reads the embed graph's table, `shared_data`) and untied (a tiny LLaMA LLaVA: its own
    head). Each stage model of the repository loads in onnxruntime from its own directory, as Triton's backends
    load it, with every file its graph names beside it."""
    import onnxruntime as ort

    import tiny
    from tgedge.export.onnx_export import export_model

    if tied:
        ckpt, clip = tg_tiny, tg_tiny / "clip"
    else:
        tiny.hf_llava(tmp_path / "ckpt", "llama")
        ckpt, clip = tmp_path / "ckpt", None
    export = export_model(ckpt, tmp_path / "export", clip=clip, external_data=True, check=False,
                          cache_mode="static-onnx")
    graphs = export.manifest.graphs
    assert bool(graphs["decoder"].shared_data) == tied and all(graphs[g].external_data for g in graphs)
    repository.write_repository(export.directory, tmp_path / "repo", repository.RepositorySettings())
    for stage, graph in graphs.items():
        version = tmp_path / "repo" / stage / "1"
        ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
        assert all((version / name).is_file() for name in [graph.external_data, *graph.shared_data])
