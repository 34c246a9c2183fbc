"""The `tgedge bench` command (the bench itself is tgedge.bench)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tgedge.cli_common import BACKENDS, EPILOG, comma_list, integer, text
from tgedge.errors import TgedgeError
from tgedge.runtime.manifest import Manifest, is_export


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="per-stage latency, TTFT and decode tokens/s of models side by side, against "
                                     "floors measured in the same run",
                       description="Answer the same question about an image (and, with --prompt-tokens, text-only "
                                   "prompts of those lengths) --runs times per model after --warmup runs, alternating "
                                   "between the models, each run generating exactly --new-tokens tokens (EOS "
                                   "ignored). Reports per-stage medians and p90 (preprocess, text_guide, vision over "
                                   "all views, fusion, embed, prefill, per-token decode), TTFT, decode tokens/s, peak "
                                   "host memory, and each figure as a ratio to its floor, measured in the same run: "
                                   "memory bandwidth (the higher of a large copy and a large one-row MatMul read, "
                                   "before and after the runs) -> decode floor from the bytes a step reads; peak "
                                   "FLOP/s (a large matmul) -> vision and prefill floors. --compare adds peers on the "
                                   "same weights. --power samples board power (tegrastats / INA3221 on Jetson, "
                                   "nvidia-smi on desktops). Figures belong to the machine and its load: compare "
                                   "models in one run.", epilog=EPILOG)
    p.add_argument("model", nargs="+", help="export directories (or checkpoints, `demo`: the torch reference)")
    p.add_argument("--backend", choices=BACKENDS, help="default: torch for a checkpoint, onnxruntime for an export")
    p.add_argument("--clip", metavar="DIR", help="CLIPModel directory for original-layout checkpoints")
    p.add_argument("--image", help="image file (default: a generated shapes image)")
    p.add_argument("--prompt", type=text, help="the question (default: the generated image's question)")
    p.add_argument("--no-image", action="store_true", help="text-only prompts alone (needs --prompt-tokens)")
    p.add_argument("--prompt-tokens", type=int_list, metavar="N,N,...",
                   help="also text-only prompts of these lengths (decode speed against context), e.g. 128,671,2048")
    p.add_argument("--batch", type=batch_list, metavar="B,B,...",
                   help="instead: the decoder alone at these batch sizes, one static-cache export (tgedge export's "
                        "default target): each of B slots prefilled with a text-only prompt of --prompt-tokens ids "
                        "(default 128), then --runs timed decoder steps of all B rows after --warmup; reports step "
                        "ms and tokens/s over all rows per B (what in-flight batching can reach), e.g. 1,4,8,16")
    p.add_argument("--turns", action="store_true",
                   help="instead: time to first token per kind of conversation turn, one model: a new image, the "
                        "same image with a new question (vision cached), a follow-up turn (guide latest and first, "
                        "tgedge chat) and the recompute of that conversation from scratch (docs/CONVERSATIONS.md)")
    p.add_argument("--runs", type=integer(1, 100_000), default=5, help="timed runs per model (default 5)")
    p.add_argument("--warmup", type=integer(0, 100_000), default=1, help="untimed runs per model first (default 1)")
    p.add_argument("--new-tokens", type=integer(2), default=None,
                   help="tokens generated per run, EOS ignored (default 16; must fit the context after the prompt)")
    p.add_argument("--compare", type=peer_list, default=(), metavar="PEERS",
                   help=f"peers on the same weights, comma-separated: {', '.join(PEERS)} (torch: tgedge's PyTorch "
                        "reference of the first export's checkpoint; genai: onnxruntime-genai, text-only prompts; "
                        "transformers: LlavaForConditionalGeneration.generate of a plain-LLaVA checkpoint; both fp32 "
                        "on the CPU unless --torch-device)")
    p.add_argument("--genai-model", metavar="DIR", action="append", default=[],
                   help="--compare genai: an onnxruntime-genai model directory (its builder's output over the same "
                        "decoder weights; repeatable)")
    p.add_argument("--genai-python", metavar="PY", default=sys.executable,
                   help="--compare genai: a Python with onnxruntime_genai installed (default: this one)")
    p.add_argument("--transformers-model", metavar="DIR",
                   help="--compare transformers: a plain-LLaVA checkpoint (default: the first export's own checkpoint "
                        "if it is plain LLaVA; for a TG-LLaVA export its twin, e.g. tgedge checkpoint random --preset "
                        "llava-qwen2-0.5b; an original-layout twin's CLIP from --clip, else DIR/clip)")
    p.add_argument("--threads", type=integer(0, 1024), default=0,
                   help="intra-op threads for every model and peer (default 0: each library's, one per core); torch's "
                        "(the reference, transformers) are set for the whole process")
    p.add_argument("--no-spin", action="store_true",
                   help="onnxruntime's idle threads block instead of spinning (a CPU shared with other work)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="--backend onnxruntime-cuda: decode steps captured once as a CUDA graph and replayed (a "
                        "--cache static export)")
    p.add_argument("--torch-device", choices=TORCH_DEVICES, default="cpu",
                   help="where torch runs the torch reference, transformers generate and checkpoints (--backend "
                        "torch): cpu (default, fp32) or cuda (fp16: torch eager on the GPU)")
    p.add_argument("--power", action="store_true", help="sample board power during the timed runs (one model)")
    p.add_argument("--json", nargs="?", const="-", metavar="F", help="write the report as JSON to F (alone: stdout)")
    p.add_argument("--markdown", metavar="F", help="write the report as Markdown tables to F")
    p.add_argument("--plot", metavar="F.png", help="write a PNG chart: stage times, decode tok/s vs context")
    p.set_defaults(func=cmd_bench)


PEERS = ("torch", "genai", "transformers")
TORCH_DEVICES = ("cpu", "cuda")  # tgedge.reference's (not imported here: it imports torch)


def int_list(value: str) -> tuple[int, ...]:
    import argparse

    values = tuple(comma_list(value, "whole numbers", int))
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: every prompt length must be >= 1")
    return values


def batch_list(value: str) -> tuple[int, ...]:
    import argparse

    values = tuple(comma_list(value, "whole numbers", int))
    if min(values) < 1 or max(values) > 1024:
        raise argparse.ArgumentTypeError(f"{value!r}: every batch size must be in [1, 1024]")
    return values


def peer_list(value: str) -> tuple[str, ...]:
    import argparse

    peers = tuple(comma_list(value, "peers"))
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown peer {', '.join(unknown) or value!r} (choose from "
                                         f"{', '.join(PEERS)})")
    return peers


def _writable(path: str | None, what: str, suffix: str | None = None, inputs=()) -> None:
    """A report path: the suffix its format needs and an existing directory (bench refuses before its runs), then the
    rule for every report file (`fileio.check_report`)."""
    from tgedge.fileio import check_report

    if path is None or path == "-":
        return
    if suffix and not path.lower().endswith(suffix):
        raise TgedgeError(f"{what} {path!r}: the file name must end in {suffix}")
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise TgedgeError(f"{what} {path!r}: no such directory {str(parent)!r}")
    check_report(path, what, inputs)


def _targets(args) -> list:
    from tgedge.bench import Target

    targets, seen = [], set()
    device = args.torch_device
    on = "" if device == "cpu" else f" ({device} fp16)"  # the torch targets' names say where they ran
    for model in args.model:
        backend = args.backend or ("onnxruntime" if is_export(model) else "torch")
        name = Path(model).name or model
        label = f"{backend}{on}" if backend == "torch" else backend
        name = f"{name} ({label})" if name in seen or backend != "onnxruntime" else name
        seen.add(name)
        targets.append(Target(name, model, backend, args.clip, "torch" if backend == "torch" else "tgedge",
                              threads=args.threads, spin=not args.no_spin,
                              cuda_graph=args.cuda_graph and backend == "onnxruntime-cuda",
                              device=device if backend == "torch" else "cpu"))
    if "torch" in args.compare:
        checkpoint, clip = _source(args, "--compare torch")
        targets.append(Target(f"torch reference{on}", checkpoint, "torch", clip, "torch", threads=args.threads,
                              device=device))
    if "transformers" in args.compare:
        if args.transformers_model:
            checkpoint = args.transformers_model
            clip = _own_clip(checkpoint) or args.clip  # a twin's own CLIP first: --clip is the models' under test
        else:
            checkpoint, clip = _source(args, "--compare transformers", checkpoints=True)
        targets.append(Target(f"transformers generate{on}", checkpoint, "torch", clip, "transformers",
                              threads=args.threads, device=device))
    elif args.transformers_model:
        raise TgedgeError("--transformers-model is for --compare transformers")
    if "genai" in args.compare:
        if not args.genai_model:
            raise TgedgeError("--compare genai needs --genai-model DIR (python -m onnxruntime_genai.models.builder "
                              "-i HF_DECODER_DIR -o DIR -p fp32|int4 -e cpu; docs/BENCHMARKS.md)")
        for model in args.genai_model:
            if not (Path(model) / "genai_config.json").exists():
                raise TgedgeError(f"--genai-model {model}: no genai_config.json (not an onnxruntime-genai model)")
            targets.append(Target(f"onnxruntime-genai {Path(model).name}", model, "onnxruntime-genai",
                                  args.genai_python, "genai", threads=args.threads))
    elif args.genai_model:
        raise TgedgeError("--genai-model is for --compare genai")
    return targets


def _source(args, flag: str, checkpoints: bool = False) -> tuple[str, str | None]:
    """The first export's checkpoint and CLIP directory (the reference a peer runs); `checkpoints`: with no export
    among the models, the first model itself (a checkpoint: bench runs those on torch)."""
    from tgedge.validate import source_checkpoint

    export = next((m for m in args.model if is_export(m)), None)
    if export is None and checkpoints:
        return args.model[0], args.clip or _own_clip(args.model[0])
    if export is None:
        raise TgedgeError(f"{flag}: give an export directory (its checkpoint is the reference)")
    manifest = Manifest.load(export)
    checkpoint = str(source_checkpoint(manifest))
    return checkpoint, args.clip or manifest.source.get("clip") or _own_clip(checkpoint)


def _own_clip(checkpoint: str) -> str | None:
    """DIR/clip: where `tgedge checkpoint random` puts an original-layout checkpoint's CLIP directory."""
    own = Path(checkpoint) / "clip"
    return str(own) if (own / "config.json").exists() else None


BATCH_ALONE = (("compare", "--compare"), ("genai_model", "--genai-model"), ("transformers_model",
                                                                            "--transformers-model"),
               ("image", "--image"), ("prompt", "--prompt"), ("no_image", "--no-image"), ("power", "--power"),
               ("markdown", "--markdown"), ("plot", "--plot"), ("cuda_graph", "--cuda-graph"), ("clip", "--clip"),
               ("new_tokens", "--new-tokens (--runs counts its steps)"))


def _refuse_given(args, options, what: str) -> None:
    """One of bench's other modes: the full bench's options it would ignore are refused, named."""
    given = [flag for name, flag in options if getattr(args, name) not in (None, False, (), [])]
    if args.torch_device != "cpu":
        given.append("--torch-device")
    if given:
        raise TgedgeError(f"{what}: it takes no {', '.join(given)}")


def _bench_batch(args) -> int:
    """`--batch`: the decoder alone at batch B (tgedge.bench.batch)."""
    from tgedge.bench.batch import batch_bench, batch_lines

    _refuse_given(args, BATCH_ALONE, "--batch measures the decoder alone")
    if len(args.model) != 1 or not is_export(args.model[0]):
        raise TgedgeError("--batch measures one export's decoder (a static-cache export: tgedge export -o DIR): "
                          f"give one export directory (got {', '.join(args.model)})")
    if args.backend not in (None, "onnxruntime", "onnxruntime-cuda"):
        raise TgedgeError(f"--batch runs on onnxruntime or onnxruntime-cuda (batched TensorRT engines are not built "
                          f"yet; got --backend {args.backend})")
    if args.prompt_tokens and len(args.prompt_tokens) > 1:
        raise TgedgeError("--batch takes one --prompt-tokens length (the cached positions of every row)")
    _writable(args.json, "--json", inputs=args.model)
    prompt = args.prompt_tokens[0] if args.prompt_tokens else 128
    report = batch_bench(args.model[0], args.backend or "onnxruntime", args.batch, prompt, args.runs, args.warmup,
                         args.threads, spin=not args.no_spin)
    return _report_out(report, args.json, batch_lines)


TURNS_ALONE = (("compare", "--compare"), ("genai_model", "--genai-model"), ("transformers_model",
                                                                            "--transformers-model"),
               ("no_image", "--no-image"), ("power", "--power"), ("markdown", "--markdown"), ("plot", "--plot"),
               ("cuda_graph", "--cuda-graph"), ("prompt_tokens", "--prompt-tokens"))


def _bench_turns(args) -> int:
    """`--turns`: TTFT per kind of conversation turn (tgedge.bench.turns)."""
    from tqdm import tqdm

    from tgedge.bench.turns import turns_bench, turns_lines

    _refuse_given(args, TURNS_ALONE, "--turns times conversation turns of one model")
    if len(args.model) != 1:
        raise TgedgeError(f"--turns measures one model (got {len(args.model)}: {', '.join(args.model)})")
    _writable(args.json, "--json", inputs=[*args.model, args.clip, args.image])
    image, prompt = _image_and_prompt(args)
    backend = args.backend or ("onnxruntime" if is_export(args.model[0]) else "torch")
    new_tokens = 16 if args.new_tokens is None else args.new_tokens
    with tqdm(total=args.runs, desc="bench --turns", unit="run", disable=None, file=sys.stderr) as bar:
        report = turns_bench(args.model[0], backend, args.clip, image, prompt, args.runs, args.warmup, new_tokens,
                             args.threads, spin=not args.no_spin, progress=bar.update)
    return _report_out(report, args.json, turns_lines)


def _image_and_prompt(args):
    """--image and --prompt, or the generated eval image with its question; (None, None) with --no-image."""
    image, prompt = args.image, args.prompt
    if args.no_image:
        return None, None
    if image is None:
        from tgedge.data import shapes

        sample = next(iter(shapes.generate(shapes.SPLIT_SEEDS["eval"], 1)))
        image, prompt = sample.image, prompt or sample.prompt
    if prompt is None:
        raise TgedgeError("--prompt is needed with --image")
    return image, prompt


def _report_out(report: dict, json_path: str | None, lines) -> int:
    """The report as JSON on stdout (`--json -`), or its summary lines (and the JSON file `--json F`)."""
    from tgedge.fileio import write_atomic

    if json_path == "-":
        print(json.dumps(report))
        return 0
    if json_path:
        write_atomic(json_path, json.dumps(report, indent=1) + "\n")
    print("\n".join(lines(report)))
    return 0


def cmd_bench(args) -> int:
    from tqdm import tqdm

    if args.batch and args.turns:
        raise TgedgeError("--batch and --turns are two different benches: give one")
    if args.batch:
        return _bench_batch(args)
    if args.turns:
        return _bench_turns(args)

    from tgedge.bench import Settings, run_bench
    from tgedge.bench.report import plot, summary_lines, to_markdown

    from tgedge.fileio import distinct_reports, write_atomic

    inputs = [*args.model, args.clip, args.image, *args.genai_model, args.transformers_model]
    _writable(args.json, "--json", inputs=inputs)
    _writable(args.markdown, "--markdown", inputs=inputs)
    _writable(args.plot, "--plot", ".png", inputs)
    distinct_reports([(args.json, "--json"), (args.markdown, "--markdown"), (args.plot, "--plot")])
    if args.no_image and args.image:
        raise TgedgeError("--no-image runs text-only prompts: it cannot take --image too (give one or the other)")
    if args.no_image and not args.prompt_tokens:
        raise TgedgeError("--no-image needs --prompt-tokens (text-only prompts to run)")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise TgedgeError("--plot needs matplotlib (pip install matplotlib, or the [serve] extra)") from None
    image, prompt = _image_and_prompt(args)
    if args.cuda_graph and args.backend != "onnxruntime-cuda":
        raise TgedgeError("--cuda-graph needs --backend onnxruntime-cuda")
    targets = _targets(args)
    if args.torch_device != "cpu":
        if not any(t.device != "cpu" for t in targets):
            raise TgedgeError("--torch-device is for torch's targets: --compare torch or transformers, or a "
                              "checkpoint on --backend torch")
        from tgedge.reference import torch_device

        torch_device(args.torch_device)  # no CUDA in this torch: said now, before any model is loaded
    new_tokens = 16 if args.new_tokens is None else args.new_tokens
    settings = Settings(args.runs, args.warmup, new_tokens, args.prompt_tokens or (), image, prompt, args.power)
    with tqdm(total=args.runs * len(targets), desc="bench", unit="run", disable=None, file=sys.stderr) as bar:
        report = run_bench(targets, settings, progress=bar.update)
    command = "tgedge " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith(("tgedge", "__main__.py")) else None
    if args.markdown:
        write_atomic(args.markdown, to_markdown(report, command))
    if args.plot:
        plot(report, args.plot)
    return _report_out(report, args.json, summary_lines)


def register(sub) -> None:
    _add_bench(sub)
