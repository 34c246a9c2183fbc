"""`tgedge loadtest`: a bounded load on a Triton server on this machine, beside the single-process loop.

Per concurrency level, that many workers (one gRPC stream each) send the data folder's samples round-robin until
`requests` answers are in (`image` False: their questions alone, text-only requests); each is timed from send to its
last response (latency) and to its first piece of text (TTFT), and its inter-token latency is the time after the
first text over the tokens after the first, (latency - TTFT) / (tokens - 1), as genai-perf defines it. The
baseline answers the same samples with `Pipeline.answer`, one after another in this process, as `tgedge run` does
(threads as ONNX Runtime picks them, or as asked). Requests/s count answers, failed ones (`errors`) included;
tokens/s count the generated tokens of every answer, all clients together. With a baseline export whose decoder
batches (a static cache), the decoder alone is then measured at batch B = each level's concurrency
(`tgedge.bench.batch`, the baseline's median prompt length cached per row, the server's intra-op threads), so the
ratio of served to possible tokens/s is in the report, and the decode share of it (concurrency / mean inter-token
latency: the rate while every client decodes) against the same. Loopback only: this is a measuring tool, not a traffic
generator.
"""

from __future__ import annotations

import io
import ipaddress
import os
import platform
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from tgedge.errors import TgedgeError
from tgedge.serving.client import Session, grpc_target

MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256


def check_loopback(url: str) -> None:
    """Refuse any address that is not this machine's loopback."""
    host = urlsplit(f"grpc://{grpc_target(url)}").hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise TgedgeError(f"{url}: cannot resolve {host!r} ({e.strerror})") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise TgedgeError(f"{url}: tgedge loadtest only loads a server on this machine (localhost, 127.0.0.1, ::1); "
                          f"{host} is {', '.join(sorted(addresses))}")


@dataclass
class Level:
    """One row of the report: a concurrency level against the server, or the in-process baseline."""
    name: str
    concurrency: int
    requests: int
    errors: int  # failed requests
    wall_s: float
    requests_per_s: float
    tokens_per_s: float  # generated tokens of every answer / wall time
    latency_ms: dict[str, float]  # p50, p90, p99, mean
    ttft_ms: dict[str, float]  # p50, p90, p99, mean
    inter_token_ms: dict[str, float]  # p50, p90, p99, mean over the answers of more than one token
    answered: int = 0  # requests - errors
    generated_tokens: int = 0
    prompt_tokens: int = 0  # the answers' median prompt length
    matches: int | None = None  # greedy answers equal to the baseline's, where there is one
    first_error: str = ""
    decoder_tokens_per_s: float | None = None  # the decoder alone at batch = concurrency (tgedge bench --batch)
    served_of_decoder: float | None = None  # tokens_per_s / decoder_tokens_per_s
    # the decode share: concurrency streams at 1 / mean inter-token latency each (the rate while every client is
    # decoding: prefills of newcomers between steps included, the levels' start and end not) against the decoder
    decode_tokens_per_s: float | None = None
    decode_of_decoder: float | None = None  # decode_tokens_per_s / decoder_tokens_per_s

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Report:
    url: str
    samples: int
    requests: int
    options: dict
    image: bool = True  # False: text-only requests (--no-image)
    levels: list[Level] = field(default_factory=list)
    baselines: list[Level] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    decoder: dict = field(default_factory=dict)  # tgedge bench --batch's report, or {"skipped": why}

    def to_dict(self) -> dict:
        return {"url": self.url, "samples": self.samples, "requests": self.requests, "options": self.options,
                "image": self.image, "machine": self.machine, "decoder": self.decoder,
                "baselines": [b.to_dict() for b in self.baselines],
                "levels": [lv.to_dict() for lv in self.levels]}


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values) * scale
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3)}


def _level(name, concurrency, results, wall, reference=None) -> Level:
    """results: (sample index, answer dict or None, latency s, ttft s or None, error text)."""
    ok = [r for r in results if r[1] is not None]
    tokens = sum(len(r[1]["tokens"]) for r in ok)
    matches = None if reference is None else sum(r[1]["tokens"] == reference[r[0]] for r in ok)
    errors = [r[4] for r in results if r[1] is None]
    itl = [(r[2] - r[3]) / (len(r[1]["tokens"]) - 1) for r in ok if r[3] is not None and len(r[1]["tokens"]) > 1]
    return Level(name, concurrency, len(results), len(errors), round(wall, 4), round(len(results) / wall, 3),
                 round(tokens / wall, 3), percentiles([r[2] for r in ok]),
                 percentiles([r[3] for r in ok if r[3] is not None]), percentiles(itl), len(ok), tokens,
                 int(np.median([r[1]["prompt_tokens"] for r in ok])) if ok else 0, matches, errors[0] if errors else "")


def baseline(export_dir: str | Path, samples: list, requests: int, options: dict, threads: int = 0,
             warmup: int = 2, image: bool = True) -> tuple[Level, dict[int, list[int]]]:
    """`tgedge run`'s loop in this process: one Pipeline, one answer after another (`threads` 0: ONNX Runtime's
    default, as `tgedge run`; else that many intra-op threads; `image` False: the questions alone)."""
    from tgedge.runtime.pipeline import Pipeline

    tokens: dict[int, list[int]] = {}
    results = []
    with Pipeline(export_dir, runner_options={"threads": threads}) as pipe:
        opts = pipe.options(**options)
        for i in range(min(warmup, len(samples))):
            pipe.answer(samples[i][0] if image else None, samples[i][1], opts)
        start = time.perf_counter()
        for n in range(requests):
            i = n % len(samples)
            t0, first = time.perf_counter(), []
            on_text = lambda piece: first or first.append(time.perf_counter())  # noqa: E731
            answer = pipe.answer(samples[i][0] if image else None, samples[i][1], opts, on_text=on_text).to_dict()
            tokens[i] = answer["tokens"]
            results.append((i, answer, time.perf_counter() - t0, first[0] - t0 if first else None, ""))
        wall = time.perf_counter() - start
    name = "single process (tgedge run loop" + (f", {threads} ORT thread{'s' * (threads > 1)})" if threads else ")")
    return _level(name, 1, results, wall), tokens


def load_level(url: str, samples: list, concurrency: int, requests: int, options: dict, timeout: float,
               reference: dict[int, list[int]] | None = None, image: bool = True) -> Level:
    """`concurrency` workers with one stream each; `requests` answers in all (`image` False: text-only)."""
    issued = iter(range(requests))
    lock = threading.Lock()
    results: list = []
    sessions = [Session(url, timeout=timeout, check=False) for _ in range(concurrency)]

    def work(session: Session) -> None:
        while True:
            with lock:
                n = next(issued, None)
            if n is None:
                return
            i = n % len(samples)
            t0 = time.perf_counter()
            try:
                reply = session.ask(samples[i][2] if image else None, samples[i][1], **options)
                result = (i, reply.answer, reply.latency_s, reply.first_text_s, "")
            except TgedgeError as e:
                result = (i, None, time.perf_counter() - t0, None, str(e))
            with lock:
                results.append(result)

    try:
        for s in sessions:  # one warm-up request per stream: connections and model instances up before timing
            s.ask(samples[0][2] if image else None, samples[0][1], **options)
        workers = [threading.Thread(target=work, args=(s,), daemon=True) for s in sessions]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        wall = time.perf_counter() - start
    finally:
        for s in sessions:
            s.close()
    return _level(f"triton, {concurrency} concurrent", concurrency, results, wall, reference)


def run_loadtest(url: str, data: str | Path, concurrency: list[int], requests: int, options: dict,
                 baseline_dir: str | Path | None = None, baseline_threads: tuple[int, ...] = (0,),
                 timeout: float = 60.0, on_level=None, image: bool = True, decoder_threads: int = 1) -> Report:
    """`decoder_threads`: the intra-op threads of the decoder-alone runs (the server's `threads` setting)."""
    from tgedge.data.folder import read_folder

    check_loopback(url)
    if not 1 <= requests <= MAX_REQUESTS:
        raise TgedgeError(f"--requests must be in [1, {MAX_REQUESTS}] (got {requests})")
    bad = [c for c in concurrency if not 1 <= c <= MAX_CONCURRENCY]
    if bad or not concurrency:
        raise TgedgeError(f"--concurrency levels must be in [1, {MAX_CONCURRENCY}] (got {concurrency})")
    records = read_folder(data)
    samples = []
    for r in records:
        with r.errors():
            samples.append((r.image, r.prompt, r.image.read_bytes()))
    Session(url, timeout=timeout).close()  # one line now if the server or the model is not there
    report = Report(url, len(samples), requests, options, image, machine=machine())
    reference = None
    if baseline_dir is not None:
        for threads in baseline_threads:
            level, tokens = baseline(baseline_dir, samples, requests, options, threads, image=image)
            report.baselines.append(level)
            reference = reference or tokens
            if on_level:
                on_level(level)
    greedy = not options.get("temperature")
    for c in concurrency:
        level = load_level(url, samples, c, requests, options, timeout, reference if greedy else None, image)
        report.levels.append(level)
        if on_level:
            on_level(level)
    if report.baselines:
        decoder_rates(report, baseline_dir, decoder_threads)
    return report


def decoder_rates(report: Report, export_dir: str | Path, threads: int, runs: int = 5, warmup: int = 1) -> None:
    """The decoder alone at batch B = each level's concurrency, into `report` (skipped, saying why, where the
    export's decoder cannot batch)."""
    from tgedge.bench.batch import batch_bench

    prompt = report.baselines[0].prompt_tokens
    try:
        batches = tuple(sorted({lv.concurrency for lv in report.levels}))
        report.decoder = batch_bench(str(export_dir), "onnxruntime", batches, prompt, runs, warmup, threads)
    except TgedgeError as e:
        report.decoder = {"skipped": str(e).removeprefix("--batch: ")}
        return
    rate = {d["batch"]: d["tokens_per_s"] for d in report.decoder["levels"]}
    for lv in report.levels:
        lv.decoder_tokens_per_s = rate[lv.concurrency]
        lv.served_of_decoder = round(lv.tokens_per_s / rate[lv.concurrency], 4)
        itl = lv.inter_token_ms.get("mean")
        if itl:
            lv.decode_tokens_per_s = round(lv.concurrency * 1000.0 / itl, 3)
            lv.decode_of_decoder = round(lv.decode_tokens_per_s / rate[lv.concurrency], 4)


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in load] if load else None}


def plot(report: Report, path: str | Path) -> None:
    """Generated tokens/s, TTFT and inter-token latency (p50, p99) per concurrency level; the baselines as
    horizontal lines."""
    try:
        import matplotlib
    except ImportError:
        raise TgedgeError("--plot needs matplotlib: pip install 'tgedge[serve]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tgedge.fileio import write_atomic

    xs = [lv.concurrency for lv in report.levels]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(xs, [lv.tokens_per_s for lv in report.levels], "o-", label="Triton")
    for ax, key, title in ((axes[1], "ttft_ms", "time to first text"), (axes[2], "inter_token_ms",
                                                                          "inter-token latency")):
        for pct, style in (("p99", "o-"), ("p50", "o--")):
            ax.plot(xs, [getattr(lv, key).get(pct, float("nan")) for lv in report.levels], style,
                    label=f"Triton {pct}")
        for b, style in zip(report.baselines, ("--", ":", "-.")):
            ax.axhline(getattr(b, key).get("p50", float("nan")), linestyle=style, color="grey",
                       label=f"{b.name} p50")
        ax.set(xlabel="concurrent clients", ylabel="ms", title=title)
    for b, style in zip(report.baselines, ("--", ":", "-.")):
        axes[0].axhline(b.tokens_per_s, linestyle=style, color="grey", label=b.name)
    axes[0].set(xlabel="concurrent clients", ylabel="generated tokens / s, all clients", title="throughput")
    for ax in axes:
        ax.set(xscale="log", xticks=xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    kind = "" if report.image else ", text-only"
    fig.suptitle(f"tgedge on Triton: {report.requests} requests per level, {report.samples} samples{kind}",
                 fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())
