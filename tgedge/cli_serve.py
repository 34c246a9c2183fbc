"""CLI commands for serving on Triton Inference Server: triton, serve, client, loadtest (docs/SERVING.md)."""

from __future__ import annotations

import json
import signal
import sys
import time

from tgedge.cli_common import EPILOG, SEED, add_output, comma_list, integer, real, sampling, text
from tgedge.errors import TgedgeError
from tgedge.serving.protocol import CONVERSATIONS, KEPT_PER_CACHED

PORT = integer(1, 65535)


def host(value: str) -> str:
    """argparse type: an IP address, or a host name made of valid labels (`999.1.1.1` is neither)."""
    import argparse
    import ipaddress
    import re

    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    numeric = all(label.isdigit() for label in labels)  # dotted numbers are an IPv4 address or nothing
    if numeric or len(value) > 253 or not all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
                                              for label in labels):
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address or a host name")
    return value


def register(sub) -> None:
    _add_triton(sub)
    _add_serve(sub)
    _add_client(sub)
    _add_loadtest(sub)


# -- tgedge triton ----------------------------------------------------------------------------------------------
def _add_triton(sub) -> None:
    p = sub.add_parser(
        "triton", help="write a Triton Inference Server model repository from an export or engine directory",
        description="One model per stage (config.pbtxt from the stage contract; text_guide and vision with dynamic "
                    "batching), the graphs or engines under 1/, and the `tgedge` entry model: decoupled, image bytes "
                    "+ question in, the answer streamed out, the decoder and its KV cache in one instance "
                    "(in-flight batching of up to --max-inflight requests with a static-cache export). "
                    "--backend python runs the stages with tgedge's ONNX Runtime runners inside Triton's Python "
                    "backend (what `tgedge serve` runs); onnxruntime and tensorrt write the configs a full Triton "
                    "container loads (docs/SERVING.md).", epilog=EPILOG)
    p.add_argument("model", help="export directory (tgedge export / quantize), or engine directory (tgedge build) "
                                 "for --backend tensorrt")
    add_output(p, "model repository to write")
    p.add_argument("--backend", choices=["python", "onnxruntime", "tensorrt"], default="python",
                   help="python (tgedge's runners in Triton's Python backend; default), onnxruntime "
                        "(platform onnxruntime_onnx), tensorrt (platform tensorrt_plan; an engine directory)")
    p.add_argument("--instances", type=integer(1, 64), default=1, help="instances of each model (default 1)")
    p.add_argument("--max-batch", type=integer(1, 1024), default=8,
                   help="images per dynamic batch of text_guide and vision (default 8)")
    p.add_argument("--queue-delay-us", type=integer(0, 10_000_000), default=2000,
                   help="how long the dynamic batcher waits to fill a batch, microseconds (default 2000)")
    p.add_argument("--threads", type=integer(1, 256), default=1,
                   help="ONNX Runtime intra-op threads of each stage session (default 1: the parallelism comes from "
                        "concurrent requests)")
    p.add_argument("--decoder-threads", type=integer(1, 256), metavar="N",
                   help="intra-op threads of the entry's decoder under in-flight batching, where one thread steps "
                        "every request (default: ONNX Runtime's, the machine's cores); each request's own decode "
                        "otherwise uses --threads")
    p.add_argument("--max-inflight", type=integer(1, 1024),
                   help="requests one entry instance decodes at once (default 8; with --backend tensorrt at most the "
                        "decoder engine's tgedge build --max-batch): with a static-cache export (tgedge export's "
                        "default target) one scheduler of that many slots "
                        "decodes them in shared decoder steps (in-flight batching); otherwise each decodes with its "
                        "own KV cache")
    p.add_argument("--conversations", type=integer(1, 4096), default=CONVERSATIONS,
                   help=f"conversations whose KV caches one entry instance keeps for their next turns (default "
                        f"{CONVERSATIONS}; the oldest let go first, their histories kept for {KEPT_PER_CACHED}x as "
                        "many: a turn after that is recomputed and says so)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip checking the graphs against the manifest's sha256 (on purpose: a graph edited by hand)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_triton)


def _engine_batch(directory) -> int:
    """The decoder engine's max batch of an engine directory; 1 for anything else (write_repository says why)."""
    from tgedge.runtime.manifest import Manifest

    try:
        return Manifest.load(directory).engine_batch("decoder")
    except TgedgeError:
        return 1


def cmd_triton(args) -> int:
    from tgedge.serving.repository import RepositorySettings, write_repository

    if args.backend == "tensorrt" and args.max_inflight not in (None, 1):  # it would be fewer without a word
        most = _engine_batch(args.model)
        if args.max_inflight > most:
            raise TgedgeError(f"--max-inflight {args.max_inflight}: with --backend tensorrt an entry instance decodes "
                              f"at most {most} request(s) per step (one execution context; the decoder engine's "
                              "tgedge build --max-batch): pass at most that, build with a larger --max-batch from a "
                              "--target tensorrt export, or add --instances")
    settings = RepositorySettings(args.backend, args.instances, args.max_batch, args.queue_delay_us,
                                  args.max_inflight or RepositorySettings.max_inflight, threads=args.threads,
                                  decoder_threads=args.decoder_threads, conversations=args.conversations)
    result = write_repository(args.model, args.output, settings, force=args.force, verify=not args.no_verify)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    for model, what in result.models.items():
        print(f"  {model:<12} {what}")
    for note in result.notes:
        print(f"  note: {note}")
    print(f"wrote a Triton model repository ({args.backend}) to {result.directory}; serve it with: "
          f"tgedge serve {result.directory}")
    return 0


# -- tgedge serve -----------------------------------------------------------------------------------------------
def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="run tritonserver on a model repository until Ctrl-C",
        description="Start the real tritonserver (--tritonserver, else one on PATH, else the one nvidia-pytriton "
                    "bundles) on REPO, wait until it is ready, print its addresses, and serve until Ctrl-C or "
                    "SIGTERM, then stop it and its Python-backend processes.", epilog=EPILOG)
    p.add_argument("repository", help="model repository (tgedge triton)")
    p.add_argument("--http-port", type=PORT, default=8000, help="HTTP/REST port (default 8000)")
    p.add_argument("--grpc-port", type=PORT, default=8001, help="gRPC port (default 8001; tgedge client uses it)")
    p.add_argument("--metrics-port", type=PORT, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--host", type=host, default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container or a cluster)")
    p.add_argument("--tritonserver", metavar="PATH", help="the tritonserver binary to run")
    p.add_argument("--timeout", type=real(1), default=180.0, help="seconds to wait for readiness (default 180)")
    p.add_argument("--quiet", action="store_true", help="do not echo the server's log")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from tgedge.serving.server import TritonServer

    ports = [args.http_port, args.grpc_port, args.metrics_port]
    if len(set(ports)) != 3:
        raise TgedgeError(f"--http-port, --grpc-port and --metrics-port must differ (got {', '.join(map(str, ports))})")
    server = TritonServer(args.repository, *ports, host=args.host, tritonserver=args.tritonserver,
                          echo=not args.quiet)
    # Ctrl-C stops the server, exit 0 (a shell that started us in the background may have ignored SIGINT);
    # SIGTERM too, exit 143 (tgedge.cli's handler raises Terminated, which this unwinds like Ctrl-C)
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, _raise_interrupt)}
    try:
        if not args.quiet:
            print(f"starting {server.install.source} on {args.repository}", file=sys.stderr, flush=True)
        server.start(args.timeout)
        server.check_models()
        print(f"ready: grpc {server.grpc_url}  http {server.http_url}  metrics "
              f"http://{server.client_host}:{server.metrics_port}/metrics  (Ctrl-C stops)", flush=True)
        while server.running:
            time.sleep(0.5)
        raise TgedgeError(f"tritonserver exited with code {server.process.returncode}: "
                          f"{_last_error(server)}")
    except KeyboardInterrupt as e:
        if not args.quiet:
            print("stopping tritonserver", file=sys.stderr, flush=True)
        if type(e) is not KeyboardInterrupt:  # tgedge.cli.Terminated: SIGTERM, exit 143 at the boundary
            raise
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _last_error(server) -> str:
    from tgedge.serving.server import error_line

    return error_line(list(server.log))


# -- tgedge client ----------------------------------------------------------------------------------------------
INT32_MAX = 2 ** 31 - 1  # max_new_tokens and top_k travel as int32 (tgedge.serving.protocol.REQUEST)


def _add_sampling(p) -> None:
    p.add_argument("--max-new-tokens", type=integer(1, INT32_MAX), default=64,
                   help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=real(0), default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=integer(0, INT32_MAX),
                   help="sample from the k most likely tokens (0 = off, the default; with --temperature > 0)")
    p.add_argument("--top-p", type=real(0, 1, lo_open=True),
                   help="nucleus sampling mass in (0, 1] (default 1.0 = off; with --temperature > 0)")
    p.add_argument("--seed", type=SEED, help="sampling seed (default 0; with --temperature > 0)")


def _options(args) -> dict:
    return {"max_new_tokens": args.max_new_tokens, **sampling(args)}


def _add_client(sub) -> None:
    p = sub.add_parser(
        "client", help="ask a tgedge model served by Triton (gRPC streaming), as tgedge run would",
        description="Send an image and a question to the `tgedge` entry model of a Triton server and print the "
                    "answer as `tgedge run` does: the text (--stream: as it arrives), or with --json one object "
                    "with text, tokens, prompt_tokens and timings (the server's, plus first_text_s and "
                    "round_trip_s measured here).", epilog=EPILOG)
    p.add_argument("url", help="the server's gRPC address: HOST:PORT or grpc://HOST:PORT (tgedge serve prints it)")
    p.add_argument("--image", action="append", metavar="PATH",
                   help="image file (any format pillow reads), sent as its bytes; repeat it for several images, "
                        "placed in order (required unless --no-image or a --conversation's follow-up)")
    p.add_argument("--no-image", action="store_true", help="a text-only request: the question alone")
    p.add_argument("--conversation", metavar="ID", type=text,
                   help="the next turn of conversation ID: answered after the conversation so far, the server's KV "
                        "cache reused; its first turn sends the images, follow-ups need none (the response says the "
                        "turn, reused_tokens, and recomputed: true where the server had let the cache go)")
    p.add_argument("--conversation-guide", choices=("latest", "first"),
                   help="with --conversation: what guides a TG model's images (default latest: the newest question; "
                        "first: the first turn's, only the new turn prefilled; tgedge chat --guide)")
    p.add_argument("--prompt", required=True, type=text, help="the question; the model's chat template wraps it")
    p.add_argument("--raw", action="store_true", help="use --prompt verbatim (it must contain <image> once); a TG "
                                                      "model then needs --guide")
    p.add_argument("--guide", metavar="TEXT", type=text,
                   help="the text the text guide encodes (default: the question; with --raw, required for TG models)")
    _add_sampling(p)
    p.add_argument("--model", default="tgedge", help="the entry model's name (default tgedge)")
    p.add_argument("--timeout", type=real(0.1), default=60.0, help="seconds to wait for the answer (default 60)")
    p.add_argument("--stream", action="store_true",
                   help="print the text as it arrives (with --json: one JSON line per piece, then the answer)")
    p.add_argument("--json", action="store_true", help="print one JSON object (tgedge run --json's keys)")
    p.set_defaults(func=cmd_client)


def _read_image(path: str) -> bytes:
    from tgedge.errors import os_error
    from tgedge.fileio import special_file

    if (kind := special_file(path)) is not None:  # before opening: a FIFO would block
        raise TgedgeError(f"{path}: is {kind}, not an image")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise os_error(e, path) from None


def cmd_client(args) -> int:
    from tgedge.serving.client import Session

    options = _options(args)  # refused before any connection
    if args.no_image and args.image:
        raise TgedgeError("give --image FILE, or --no-image for a text-only request (not both)")
    if not args.no_image and not args.image and args.conversation is None:
        raise TgedgeError("give --image FILE, or --no-image for a text-only request (one of them)")
    if args.conversation is None and args.conversation_guide is not None:
        raise TgedgeError("--conversation-guide is for a --conversation's turns")
    if args.conversation is not None and (args.raw or args.guide is not None):
        raise TgedgeError("--conversation takes the question alone (no --raw, no --guide): the server renders the "
                          "whole conversation with the chat template")
    image = [_read_image(p) for p in args.image or []]
    if args.conversation is not None:
        options.update(conversation=args.conversation, conversation_guide=args.conversation_guide)
    on_text = None
    if args.stream:
        on_text = ((lambda s: print(json.dumps({"text": s}), flush=True)) if args.json
                   else (lambda s: (sys.stdout.write(s), sys.stdout.flush())))
    with Session(args.url, args.model, args.timeout) as session:
        reply = session.ask(image, args.prompt, on_text=on_text, raw=args.raw, guide=args.guide, **options)
    answer = reply.answer
    answer["timings"].update(first_text_s=None if reply.first_text_s is None else round(reply.first_text_s, 6),
                             round_trip_s=round(reply.latency_s, 6))
    if args.json:
        print(json.dumps(answer))
    elif args.stream:
        print()
    else:
        print(answer["text"])
    return 0


# -- tgedge loadtest --------------------------------------------------------------------------------------------
def _levels(value: str) -> list[int]:
    import argparse

    levels = comma_list(value, "integers (e.g. 1,4,16)", int)
    if any(not 1 <= c <= 256 for c in levels):
        raise argparse.ArgumentTypeError(f"levels must be integers in [1, 256] (got {value!r})")
    return levels


def _add_loadtest(sub) -> None:
    p = sub.add_parser(
        "loadtest", help="measure a Triton server on this machine beside the single-process loop",
        description="Send a data folder's samples to the `tgedge` entry model at each concurrency level (one gRPC "
                    "stream per client), a bounded number of requests per level, and report per level requests/s, "
                    "generated tokens/s (all clients together), latency p50/p90/p99, time to first text (TTFT) and "
                    "inter-token latency ((latency - TTFT) / (tokens - 1)) p50/p99, and failed requests; with "
                    "--baseline, the same samples answered one after another in this process (tgedge run's loop) "
                    "first, and after the levels the baseline export's decoder alone at batch B = each concurrency "
                    "(tgedge bench --batch; a static-cache export), beside the tokens/s served. Loopback addresses "
                    "only.", epilog=EPILOG)
    p.add_argument("url", help="the server's gRPC address on this machine, e.g. 127.0.0.1:8001")
    p.add_argument("--data", required=True, help="data folder (images/ + samples.jsonl), e.g. tgedge data shapes")
    p.add_argument("--concurrency", type=_levels, default=[1, 4, 16], help="concurrency levels (default 1,4,16)")
    p.add_argument("--requests", type=integer(1, 100_000), default=200, help="requests per level (default 200)")
    p.add_argument("--no-image", action="store_true",
                   help="text-only requests: the samples' questions without their images (the decoder alone)")
    p.add_argument("--baseline", metavar="DIR",
                   help="export directory, or the model repository (its tgedge/1/export), for the single-process "
                        "loop on the same samples")
    p.add_argument("--baseline-threads", type=_threads, default=None,
                   help="ONNX Runtime intra-op threads of the baseline, comma-separated for several rows "
                        "(0: ONNX Runtime's default, as tgedge run; default 0)")
    _add_sampling(p)
    p.add_argument("--timeout", type=real(0.1), default=60.0, help="seconds per request before it counts as an "
                                                                  "error (default 60)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="write throughput and latency per level as a PNG")
    p.set_defaults(func=cmd_loadtest)


def _entry_threads(repo) -> int:
    """The intra-op threads of the entry model's decoder in a repository tgedge triton wrote: its `decoder_threads`
    (0: ONNX Runtime's default), else its `threads` (1 where it says none)."""
    from tgedge.serving.repository import parse_config

    config = repo / "tgedge" / "config.pbtxt"
    if not config.is_file():
        return 1
    params = parse_config(config).parameters
    for key in ("decoder_threads", "threads"):
        if key in params and params[key].string_value.isdigit():
            return int(params[key].string_value)
    return 1


def _decoder_lines(report) -> list[str]:
    d = report.decoder
    if not d:
        return []
    if "skipped" in d:
        return [f"decoder alone at batch B: not measured ({d['skipped']})"]
    lines = [f"decoder alone at batch B ({d['prompt_tokens']} cached positions, {d['threads']} thread(s), median of "
             f"{d['runs']} steps), against what the server generated:"]
    for lv in report.levels:
        decode = (f"; decoding {lv.decode_tokens_per_s:9.1f} tok/s = {lv.decode_of_decoder:.3f} of it"
                  if lv.decode_tokens_per_s else "")
        lines.append(f"  batch {lv.concurrency:>4}  {lv.decoder_tokens_per_s:9.1f} tok/s  served "
                     f"{lv.tokens_per_s:9.1f} tok/s = {lv.served_of_decoder:.3f} of it{decode}")
    return lines


def _threads(value: str) -> tuple[int, ...]:
    import argparse

    threads = tuple(comma_list(value, "integers >= 0", int))
    if any(t < 0 or t > 256 for t in threads):
        raise argparse.ArgumentTypeError(f"thread counts must be in [0, 256] (got {value!r})")
    return threads


def cmd_loadtest(args) -> int:
    from pathlib import Path

    from tgedge.fileio import check_report, distinct_reports, write_atomic
    from tgedge.runtime.manifest import is_export
    from tgedge.serving.loadtest import plot, run_loadtest

    for path, flag in ((args.json, "--json"), (args.plot, "--plot")):
        check_report(path, flag, [args.data, args.baseline])
    distinct_reports([(args.json, "--json"), (args.plot, "--plot")])
    baseline = args.baseline
    if args.baseline_threads is not None and not baseline:
        raise TgedgeError("--baseline-threads sets the --baseline loop's threads: it needs --baseline")
    decoder_threads = 0  # a batching repository's default (ONNX Runtime's threads); a repository given says its own
    if baseline and not is_export(baseline) and (Path(baseline) / "tgedge/1/export").is_dir():
        decoder_threads = _entry_threads(Path(baseline))
        baseline = str(Path(baseline) / "tgedge/1/export")
    if baseline and not is_export(baseline):  # before connecting: the option is wrong whatever the server says
        raise TgedgeError(f"--baseline {args.baseline}: not an export (no manifest.json) nor a model repository "
                          "with tgedge/1/export")

    def show(level) -> None:
        lat, ttft, itl = level.latency_ms, level.ttft_ms, level.inter_token_ms
        match = "" if level.matches is None else f"  same tokens {level.matches}/{level.answered}"
        print(f"{level.name:<46} {level.requests_per_s:7.1f} req/s {level.tokens_per_s:8.1f} tok/s  latency p50 "
              f"{lat.get('p50', 0):7.1f} p99 {lat.get('p99', 0):7.1f}  ttft p50 {ttft.get('p50', 0):6.1f} p99 "
              f"{ttft.get('p99', 0):6.1f}  itl p50 {itl.get('p50', 0):5.1f} p99 {itl.get('p99', 0):5.1f} ms  "
              f"failed {level.errors}{match}", flush=True)
        if level.first_error:
            print(f"  first error: {level.first_error}", flush=True)

    report = run_loadtest(args.url, args.data, args.concurrency, args.requests, _options(args), baseline,
                          args.baseline_threads or (0,), args.timeout, on_level=show, image=not args.no_image,
                          decoder_threads=decoder_threads)
    for line in _decoder_lines(report):
        print(line, flush=True)
    if args.json:
        write_atomic(args.json, json.dumps(report.to_dict(), indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    failed = sum(lv.errors for lv in report.levels)
    if report.baselines and report.levels:
        best = max(report.levels, key=lambda lv: lv.concurrency)
        for b in report.baselines:
            print(f"concurrency {best.concurrency} vs {b.name}: {best.requests_per_s / b.requests_per_s:.2f}x "
                  "requests/s")
    return 1 if failed else 0
