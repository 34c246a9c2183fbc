"""`tgedge build`: an export directory -> TensorRT engines (TensorRT 8.6 / 10.x / 11.x, or TensorRT for RTX).

Networks are strongly typed wherever the library has them (10.x, 11.x, RTX): the graph's own types set
each layer's precision, so an fp16 export builds fp16 engines and a Q/DQ export int8 engines — the only
INT8 11.x still knows (implicit calibration is gone). TensorRT 8.6 gets explicit batch and the FP16 / INT8
builder flags instead. Each graph gets its optimisation profiles from the manifest's min/opt/max dims; the
decoder gets two, prefill (no past) and decode (one token), because TensorRT checks a profile's shapes
together and `total = past + sequence` cannot hold at both maxima.

The engine directory is a copy of the export directory plus `<graph>.engine` files; manifest.json gains an
`engines` section with each engine's metadata (TensorRT version, GPU and compute capability, precision,
tgedge version, source graph hash), which `TensorRTRunner` checks before it loads an engine.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tgedge import __version__
from tgedge.contract import BATCH, VIEWS
from tgedge.errors import TgedgeError
from tgedge.fileio import atomic_dir, inside, write_atomic
from tgedge.precision import PRECISIONS
from tgedge.runtime.manifest import Manifest
from tgedge.runtime.tensorrt import device_info, import_tensorrt

BACKENDS = ("tensorrt", "tensorrt_rtx")


def profiles(manifest: Manifest, graph: str, max_batch: int = 1) -> list[dict[str, tuple[int, int, int]]]:
    """Symbolic dim -> (min, opt, max) per optimisation profile: the stage contract's (the decoder's are its KV
    cache's prefill and decode profiles, in the order `TensorRTRunner` selects them). `max_batch` > 1: the batch
    dim (and the views of that many images) up to it, for batched serving: the decoder's decode profile runs up to
    `max_batch` sequences in one call (a batched KV cache's slots, optimised for all of them), its prefill one (the
    scheduler prefills a newcomer alone, and a batched prefill profile would size activations for max_batch full
    prompts)."""
    found = manifest.contract.stage_profiles(graph)
    if max_batch == 1:
        return found
    out = []
    for i, profile in enumerate(found):
        profile = dict(profile)
        if BATCH in profile and not (graph == "decoder" and i == 0):
            low, _, _ = profile[BATCH]
            profile[BATCH] = (low, max_batch if graph == "decoder" else 1, max_batch)
        if VIEWS in profile:
            low, opt, high = profile[VIEWS]
            profile[VIEWS] = (low, opt, high * max_batch)
        out.append(profile)
    return out


def _shapes(tensor, profile) -> tuple[list[int], list[int], list[int]]:
    return tuple([profile[d][k] if isinstance(d, str) else d for d in tensor.shape] for k in range(3))


def trtexec_line(backend: str, manifest: Manifest, graph: str, engine: str, workspace_mb: int,
                 timing_cache: str | None, max_batch: int = 1) -> str:
    """The equivalent command line. Several profiles (the decoder's prefill and decode) are written as
    trtexec 10's `--profile=0 --minShapes=.. --optShapes=.. --maxShapes=.. --profile=1 ..`."""
    tool = "tensorrt_rtx" if backend == "tensorrt_rtx" else "trtexec"
    entry = manifest.graphs[graph]
    dynamic = [t for t in entry.inputs if any(isinstance(d, str) for d in t.shape)]
    all_profiles = profiles(manifest, graph, max_batch)
    args = [tool, f"--onnx={entry.file}", f"--saveEngine={engine}", "--stronglyTyped"]
    for i, profile in enumerate(all_profiles if dynamic else []):
        if len(all_profiles) > 1:
            args.append(f"--profile={i}")
        for key, k in (("--minShapes", 0), ("--optShapes", 1), ("--maxShapes", 2)):
            args.append(f"{key}=" + ",".join(f"{t.name}:{'x'.join(map(str, _shapes(t, profile)[k]))}" for t in dynamic))
    args.append(f"--memPoolSize=workspace:{workspace_mb}M")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    return shlex.join(args)


@dataclass
class BuildResult:
    directory: Path
    engines: dict[str, dict] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"directory": str(self.directory), "engines": self.engines, "commands": self.commands}


def _progress_monitor(trt, say):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, parent_phase, phase_name, num_steps):
            if parent_phase is None:
                say(f"  {phase_name}")

        def step_complete(self, phase_name, step):
            return True  # keep going

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _decomposable_attention(trt, network) -> int:
    """Let each attention layer (an ONNX `Attention` node, the static-onnx decoder's) fall back to several kernels
    where TensorRT has no fused one for its shapes and types (fp32 has none): without it such a build fails. A fused
    kernel is still used where one exists. -> how many attention layers the network has."""
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if kind is None:  # a TensorRT without attention layers
        return 0
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer  # the parser hands out the base class (Polygraphy's cast)
            layer.attention.decomposable = True
            count += 1
    return count


def build_engine(trt, manifest: Manifest, graph: str, workspace_mb: int, cache_bytes: bytes | None | bool,
                 say: Callable[[str], None], max_batch: int = 1) -> tuple[bytes, bytes | None, dict]:
    """-> (serialized engine, updated timing cache, build details); cache_bytes False: no timing cache."""
    major = int(trt.__version__.split(".")[0])
    # Without a GPU, TensorRT for RTX logs a CUDA driver error while parsing, then builds fine: hide that
    # unless --debug; real parse and build errors are raised below with the parser's own messages.
    verbose = logging.getLogger("tgedge").isEnabledFor(logging.DEBUG)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.INTERNAL_ERROR)
    builder = trt.Builder(logger)
    flag_names = trt.NetworkDefinitionCreationFlag.__members__
    strongly_typed = "STRONGLY_TYPED" in flag_names
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    if not strongly_typed and "EXPLICIT_BATCH" in flag_names:  # 8.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    path = manifest.graph_path(graph)
    if not parser.parse_from_file(str(path)):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(parser.num_errors))
        hint = " (onnxruntime's MatMulNBits is not a TensorRT op: quantise int4w/int8w graphs for the onnxruntime " \
               "backends)" if "MatMulNBits" in errors else ""
        raise TgedgeError(f"{path}: TensorRT {trt.__version__} cannot parse this graph: {errors}{hint}")
    attention = _decomposable_attention(trt, network)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    precision = manifest.graphs[graph].precision
    if precision not in PRECISIONS:
        raise TgedgeError(f"{manifest.directory}/manifest.json graphs.{graph}.precision | got {precision!r} | "
                          f"expected one of {', '.join(PRECISIONS)}")
    if not strongly_typed:  # TensorRT 8.6: precisions by flag
        for flag in PRECISIONS[precision].tensorrt_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    graph_profiles = profiles(manifest, graph, max_batch)
    for profile in graph_profiles:
        p = builder.create_optimization_profile()
        for t in manifest.graphs[graph].inputs:
            p.set_shape(t.name, *_shapes(t, profile))
        config.add_optimization_profile(p)
    cache = None
    if cache_bytes is not False and hasattr(config, "create_timing_cache"):
        cache = config.create_timing_cache(cache_bytes or b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        config.progress_monitor = _progress_monitor(trt, say)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise TgedgeError(f"{path}: TensorRT {trt.__version__} could not build an engine (run with --debug for its log)")
    targets = []
    if hasattr(config, "num_compute_capabilities"):
        targets = [str(config.get_compute_capability(i)).split(".")[-1] for i in range(config.num_compute_capabilities)]
    details = {"strongly_typed": strongly_typed, "tensorrt_major": major, "profiles": len(graph_profiles),
               "max_batch": max_batch,
               "target_compute_capabilities": targets, "attention_layers": attention}
    new_cache = bytes(memoryview(cache.serialize())) if cache is not None else None
    return bytes(memoryview(engine)), new_cache, details


def build_engines(export_dir: str | Path, out: str | Path, backend: str = "tensorrt", workspace_mb: int = 1024,
                  timing_cache: str | Path | None = None, graphs: list[str] | None = None,
                  on_step: Callable[[str], None] | None = None, force: bool = False, max_batch: int = 1
                  ) -> BuildResult:
    """`max_batch`: requests one engine serves in one call (`profiles`); each engine's metadata records it, and the
    TensorRT runner's batched KV cache holds at most that many slots."""
    say = on_step or (lambda s: None)
    if backend not in BACKENDS:
        raise TgedgeError(f"unknown build backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if workspace_mb < 1:
        raise TgedgeError(f"--workspace must be >= 1 MB (got {workspace_mb})")
    if not (isinstance(max_batch, int) and max_batch >= 1):
        raise TgedgeError(f"--max-batch must be an integer >= 1 (got {max_batch!r})")
    manifest = Manifest.load(export_dir)  # the input and --graph first: true whatever this machine has installed
    names = graphs or list(manifest.graphs)
    unknown = [g for g in names if g not in manifest.graphs]
    if unknown:
        raise TgedgeError(f"--graph: unknown graph(s) {', '.join(unknown)} (this export has "
                          f"{', '.join(manifest.graphs)})")
    if "decoder" in names and manifest.contract.cache.mode == "static":
        raise TgedgeError(f"{manifest.directory}: this export's decoder is the static cache for onnxruntime "
                          "(its GroupQueryAttention and SkipSimplifiedLayerNormalization are not TensorRT ops): "
                          "export again with --target tensorrt (TensorRT 10.15+ / TensorRT for RTX) or --target "
                          "jetpack6 (JetPack 6's TensorRT 10.3)")
    trt = import_tensorrt(backend)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.exists() else None
    if backend == "tensorrt_rtx":  # its timing-cache calls are no-ops (TensorRT-RTX 1.2+)
        if cache_path:
            say("TensorRT for RTX keeps no timing cache: --timing-cache is ignored")
        cache_path = None
    use_cache = backend != "tensorrt_rtx"
    gpu = device_info()
    result = BuildResult(Path(out))
    with atomic_dir(out, kind="engines", inputs=[export_dir, timing_cache], force=force) as tmp:
        for name in manifest.listed_files(engines=False):  # what the manifest names, nothing else of the folder
            shutil.copyfile(inside(manifest.directory, name, f"{manifest.directory}/manifest.json"), tmp / name)
        engines = {}
        for graph in names:
            engine_file = f"{graph}.engine"
            say(f"building {graph} ({manifest.graphs[graph].precision}) with {backend} {trt.__version__}")
            start = time.perf_counter()
            data, new_cache, details = build_engine(trt, manifest, graph, workspace_mb,
                                                    cache_bytes if use_cache else False, say, max_batch)
            cache_bytes = new_cache if use_cache else None
            (tmp / engine_file).write_bytes(data)
            engines[graph] = {"file": engine_file, "backend": backend, "tensorrt_version": trt.__version__,
                              "gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability"),
                              "precision": manifest.graphs[graph].precision, "tgedge_version": __version__,
                              "source_sha256": manifest.graphs[graph].sha256, "bytes": len(data),
                              "build_s": round(time.perf_counter() - start, 3), **details}
            result.commands[graph] = trtexec_line(backend, manifest, graph, engine_file, workspace_mb,
                                                  str(cache_path) if cache_path else None, max_batch)
        built = Manifest.load(tmp)
        built.engines = engines
        built.save(tmp)
        result.engines = engines
    if cache_path and cache_bytes:
        write_atomic(cache_path, cache_bytes)
    return result
