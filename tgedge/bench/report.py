"""`tgedge bench`'s report: the runs summarised (per-stage medians and p90 beside their floors) into a JSON-ready
dict, and from it Markdown tables, a PNG chart (matplotlib), the terminal lines."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from tgedge.errors import TgedgeError

ENCODE_STAGES = ("text_guide", "vision", "fusion", "embed")
STAGES = ("preprocess", *ENCODE_STAGES, "prefill", "decode_token")  # per-stage medians and p90, in this order
STAGE_COLUMNS = ("preprocess", "text_guide", "vision", "fusion", "embed", "prefill")


def stats(values: list[float]) -> dict:
    """Median and 90th percentile (nearest rank) of a list of seconds."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "p90": ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
            "n": len(ordered)}


def _ratio(floor: float, measured: float) -> float:
    return round(floor / measured, 3) if measured > 0 else float("nan")


def _measurement(runs: list[dict], key: str, cfg: dict, info: dict, floors) -> dict:
    """Stage stats of one measurement (the image question or a context) over the runs, with floors and ratios."""
    from tgedge.floors import decoder_flops, vision_flops

    rows = [r[key] for r in runs]
    first = rows[0]
    t, n = first["prompt_tokens"], len(first["decode_token"]) + 1
    stages = {s: stats([r[s] for r in rows]) for s in ("preprocess", *ENCODE_STAGES, "prefill") if s in first}
    stages["decode_token"] = stats([x for r in rows for x in r["decode_token"]])
    token_s = stages["decode_token"]["median"]
    floor = {"prefill_s": floors.compute_s(decoder_flops(cfg["decoder"], t)),
             "decode_token_s": floors.decode_step_s(t + n // 2)}  # the mean context while decoding
    if "vision" in first:
        floor["vision_s"] = floors.compute_s(vision_flops(cfg["vision"], first["views"]))
    of_floor = {"prefill": _ratio(floor["prefill_s"], stages["prefill"]["median"]),
                "decode": _ratio(floor["decode_token_s"], token_s)}
    if "vision_s" in floor:
        of_floor["vision"] = _ratio(floor["vision_s"], stages["vision"]["median"])
    out = {"prompt_tokens": t, "new_tokens": n, "stages": {k: {m: round(v, 6) if m != "n" else v for m, v in s.items()}
                                                             for k, s in stages.items()},
           "ttft": {m: round(v, 6) if m != "n" else v for m, v in stats([r["ttft"] for r in rows]).items()},
           "decode_tokens_per_s": round(1 / token_s, 2), "floor_tokens_per_s": round(1 / floor["decode_token_s"], 2),
           "floors_s": {k: round(v, 6) for k, v in floor.items()}, "of_floor": of_floor,
           "load": [round(r["load"], 2) for r in rows]}
    if "views" in first:
        out["views"] = first["views"]
    return out


def summarize(targets: list, settings, peaks, results: dict) -> dict:
    """The report: machine, settings, floors, and per target its measurements (JSON-ready)."""
    import datetime
    import platform

    from tgedge import __version__
    from tgedge.floors import Floors

    out_targets = []
    for target in targets:
        r, info = results[target.name], target.info
        floors = Floors(peaks, info["weight_bytes"], info["kv_per_position"])
        entry = {"name": target.name, "kind": target.kind, "model": target.model, "backend": target.backend,
                 "threads": target.threads or "default", "spin": target.spin, "cuda_graph": target.cuda_graph,
                 "precision": info["precision"], "cache": info["cache"], "runs": len(r["runs"]),
                 "decoder_weight_bytes": info["weight_bytes"], "kv_bytes_per_position": info["kv_per_position"],
                 "memory": {"rss_loaded_mb": round(r["rss_loaded"] / 2**20, 1),
                            "peak_rss_mb": round(r["peak_rss"] / 2**20, 1)}}
        if settings.image is not None and "image" in r["runs"][0]:
            entry["image"] = _measurement(r["runs"], "image", info["model"], info, floors)
        entry["contexts"] = [_measurement(r["runs"], f"context:{n}", info["model"], info, floors)
                             for n in settings.prompt_tokens]
        if "power" in r:
            entry["power"] = r["power"]
        out_targets.append(entry)
    return {"tgedge_version": __version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "load_average_end": [round(x, 2) for x in os.getloadavg()]},
            "settings": {"runs": settings.runs, "warmup": settings.warmup, "new_tokens": settings.new_tokens,
                         "prompt_tokens": list(settings.prompt_tokens), "image": settings.image is not None,
                         "prompt": settings.prompt},
            "floors": peaks.to_dict(), "targets": out_targets}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _ms(stage: dict | None) -> str:
    return "-" if stage is None else f"{1e3 * stage['median']:.1f} / {1e3 * stage['p90']:.1f}"


def _load(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{ordered[len(ordered) // 2]:.1f}" if ordered else "-"


def to_markdown(report: dict, command: str | None = None) -> str:
    """Tables: the image question stage by stage (median / p90 ms), then decode and prefill by context length, each
    with its floor and the ratio floor / measured (1.0 = at the floor)."""
    m, f, s = report["machine"], report["floors"], report["settings"]
    lines = [f"# tgedge bench, {report['date']}", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += [f"Machine: {m['cpu']}, {m['cores']} cores; load average at the end {m['load_average_end']}. "
              f"Floors measured in this run: memory bandwidth {f['bandwidth_gb_s']} GB/s ({f['how'].get('bandwidth')}), "
              f"peak {f['peak_gflop_s']} GFLOP/s ({f['how'].get('flops')})"
              + (f"; {f['how']['measured']}" if "measured" in f["how"] else "") +
              f". {s['runs']} runs after {s['warmup']} "
              f"warm-up, alternating between models; {s['new_tokens']} new tokens per run (EOS ignored). "
              "Times: median / p90 in ms; `of floor` = floor time / measured time (1.0 = at the floor); `load`: the "
              "1-minute load average at the start of each run (median).", ""]
    with_image = [t for t in report["targets"] if "image" in t]
    if with_image:
        lines += [f"## The question with its image ({with_image[0]['image']['prompt_tokens']} prompt tokens, "
                  f"{with_image[0]['image'].get('views', '?')} vision views)", "",
                  "| model | " + " | ".join(STAGE_COLUMNS) + " | TTFT | decode ms/token | tok/s | floor tok/s | "
                  "decode of floor | vision of floor | prefill of floor | peak RSS MB | load |",
                  "|---|" + "---:|" * (len(STAGE_COLUMNS) + 9)]
        for t in with_image:
            i = t["image"]
            st = i["stages"]
            lines.append(f"| {t['name']} | " + " | ".join(_ms(st.get(c)) for c in STAGE_COLUMNS) +
                         f" | {_ms(i['ttft'])} | {_ms(st['decode_token'])} | {i['decode_tokens_per_s']} | "
                         f"{i['floor_tokens_per_s']} | {i['of_floor']['decode']} | {i['of_floor'].get('vision', '-')} | "
                         f"{i['of_floor']['prefill']} | {t['memory']['peak_rss_mb']} | {_load(i['load'])} |")
        lines.append("")
    if any(t["contexts"] for t in report["targets"]):
        lines += ["## Text-only prompts by context length", "",
                  "| model | prompt tokens | prefill ms | prefill of floor | decode ms/token | tok/s | floor tok/s | "
                  "decode of floor | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for t in report["targets"]:
            for c in t["contexts"]:
                st = c["stages"]
                lines.append(f"| {t['name']} | {c['prompt_tokens']} | {_ms(st['prefill'])} | {c['of_floor']['prefill']} "
                             f"| {_ms(st['decode_token'])} | {c['decode_tokens_per_s']} | {c['floor_tokens_per_s']} | "
                             f"{c['of_floor']['decode']} | {_load(c['load'])} |")
        lines.append("")
    lines += ["| model | backend | threads | decoder precision | KV cache | decoder weight MB | KV KB/position | "
              "loaded RSS MB |", "|---|---|---|---|---|---:|---:|---:|"]
    for t in report["targets"]:
        spin = "" if t.get("spin", True) else ", no spin"
        lines.append(f"| {t['name']} | {t['backend']} | {t.get('threads', 'default')}{spin} | {t['precision']} | "
                     f"{t['cache']} | "
                     f"{t['decoder_weight_bytes'] / 2**20:.1f} | {t['kv_bytes_per_position'] / 1024:.1f} | "
                     f"{t['memory']['rss_loaded_mb']} |")
    return "\n".join(lines) + "\n"


def _stage_bars(ax, targets: list[dict]) -> None:
    """Stacked bars: each model's stage medians of the image question, decode as its tokens' total."""
    names = [t["name"] for t in targets]
    bottom = [0.0] * len(names)
    for stage in (*STAGE_COLUMNS, "decode"):
        heights = []
        for t in targets:
            i = t["image"]
            st = i["stages"]
            heights.append(st["decode_token"]["median"] * (i["new_tokens"] - 1) if stage == "decode"
                           else st.get(stage, {"median": 0.0})["median"])
        ax.bar(names, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_title("the image question: seconds per stage (median)")
    ax.set_ylabel("s")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelrotation=20)


def plot(report: dict, path: str | Path) -> None:
    """Stage medians of the image question per model (stacked bars), and decode tok/s against context length per
    model with its floor (dashed)."""
    try:
        import matplotlib
    except ImportError:
        raise TgedgeError("--plot needs matplotlib (pip install matplotlib, or the [serve] extra)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = report["targets"]
    images = [t for t in targets if "image" in t]
    if images:
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
        _stage_bars(left, images)
    else:  # --no-image: the context chart alone, not an empty panel beside it
        fig, right = plt.subplots(1, 1, figsize=(7, 5))
    for t in targets:
        points = sorted((c["prompt_tokens"], c["decode_tokens_per_s"], c["floor_tokens_per_s"]) for c in t["contexts"])
        if "image" in t:
            points = sorted(points + [(t["image"]["prompt_tokens"], t["image"]["decode_tokens_per_s"],
                                       t["image"]["floor_tokens_per_s"])])
        if points:
            line, = right.plot([p[0] for p in points], [p[1] for p in points], "o-", label=t["name"])
            right.plot([p[0] for p in points], [p[2] for p in points], "--", color=line.get_color(), alpha=0.6)
    right.set_title("decode tokens/s vs prompt length (dashed: bandwidth floor)")
    right.set_xlabel("prompt tokens")
    right.set_ylabel("tokens/s")
    right.set_ylim(bottom=0)
    if any(t["contexts"] or "image" in t for t in targets):
        right.legend(fontsize=8)
    fig.suptitle(f"tgedge bench {report['date']}: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
                 f"{report['floors']['bandwidth_gb_s']} GB/s, {report['floors']['peak_gflop_s']} GFLOP/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
    plt.close(fig)


def summary_lines(report: dict) -> list[str]:
    f = report["floors"]
    lines = [f"floors: {f['bandwidth_gb_s']} GB/s memory bandwidth, {f['peak_gflop_s']} GFLOP/s peak (this run)"]
    for t in report["targets"]:
        head = f"{t['name']} ({t['backend']}, decoder {t['precision']}, {t['cache']} cache), {t['runs']} runs"
        lines.append(head)
        if "image" in t:
            i = t["image"]
            st = i["stages"]
            enc = " | ".join(f"{c} {1e3 * st[c]['median']:.1f}" for c in STAGE_COLUMNS if c in st)
            lines.append(f"  image, {i['prompt_tokens']} prompt tokens: {enc} | TTFT {1e3 * i['ttft']['median']:.1f} ms"
                         f" | decode {i['decode_tokens_per_s']} tok/s (floor {i['floor_tokens_per_s']}, "
                         f"{i['of_floor']['decode']} of it)")
        for c in t["contexts"]:
            lines.append(f"  {c['prompt_tokens']} prompt tokens: prefill {1e3 * c['stages']['prefill']['median']:.1f} ms "
                         f"({c['of_floor']['prefill']} of floor) | decode {c['decode_tokens_per_s']} tok/s (floor "
                         f"{c['floor_tokens_per_s']}, {c['of_floor']['decode']} of it)")
        lines.append(f"  peak RSS {t['memory']['peak_rss_mb']} MB" +
                     (f" | power {t['power']['average_w']} W, {t['power']['energy_per_token_j']} J/token"
                      if "power" in t else ""))
    return lines
