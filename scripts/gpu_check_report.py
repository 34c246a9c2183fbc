"""`scripts/gpu_check --run`'s Markdown and PNG, from its results.json: the phases, the device floors, the parity of
greedy tokens, the KV cache's copies per step, and the bench's own tables and chart (tgedge.bench.report) over the
contexts measured."""

from __future__ import annotations

from pathlib import Path


def write_markdown(results: dict, path: Path) -> None:
    from tgedge.bench.report import to_markdown

    phases = results["phases"]
    lines = [f"# scripts/gpu_check --run --device {results['device']} ({results['started']})", ""]
    if results.get("no_gpu_figure"):
        lines += ["**A CPU rehearsal: no figure here is a GPU figure.**", ""]
    lines += ["| phase | budget s | seconds | status |", "|---|---|---|---|"]
    lines += [f"| {name} | {p.get('budget_s')} | {p.get('seconds', '-')} | {p.get('status', 'running')} |"
              for name, p in phases.items()]
    peaks = phases.get("floors", {}).get("peaks")
    if peaks:
        lines += ["", f"Floors ({results['device']}): bandwidth **{peaks['bandwidth_gb_s']} GB/s** "
                      f"({peaks['how'].get('bandwidth')}); peak **{peaks['peak_gflop_s']} GFLOP/s** "
                      f"({peaks['how'].get('flops')})."]
    rows = phases.get("parity", {}).get("rows")
    if rows:
        lines += ["", "## Greedy tokens: onnxruntime on the device against onnxruntime CPU", "",
                  "| model | dtype | device | tokens | equal | first difference |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['dtype']} | {r['device']} | {r['tokens']} | {'yes' if r['equal'] else 'NO'} | "
                  f"{'-' if r['first_difference'] is None else r['first_difference']} |" for r in rows]
    for key, title in (("cache", ""), ("cache_cuda_graph", ", CUDA graphs")):
        cache = phases.get("copies", {}).get(key)
        if cache:
            lines += ["", f"## The KV cache per decode step{title}", ""]
            lines += [f"- {k}: {v}" for k, v in cache.items()]
    bench = phases.get("bench", {})
    for key in ("peers", "transformers", "cuda_graphs"):
        if key in bench:
            lines += ["", f"{key}: {bench[key]}"]
    if bench.get("rows"):
        lines += ["", "## TTFT and decode against the floors", "",
                  "| target | backend | prompt tokens | TTFT ms | decode tok/s | floor tok/s | decode of floor | "
                  "prefill of floor |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['target']} | {r['backend']} | {r['context']} | {1e3 * r['ttft_s']:.1f} | "
                  f"{r['decode_tokens_per_s']} | {r['floor_tokens_per_s']} | {r['of_floor']['decode']} | "
                  f"{r['of_floor']['prefill']} |" for r in bench["rows"]]
    if bench.get("report"):
        body = to_markdown(bench["report"]).splitlines()
        lines += ["", "## Bench (tgedge bench: one call per mode, its tables)", ""] + [
            "#" + b if b.startswith("#") else b for b in body[1:]]
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = results["phases"].get("bench", {}).get("report")
    if report:
        from tgedge.bench.report import plot

        plot(report, path)
        return
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, "no bench figures in this run", ha="center", va="center")
    fig.savefig(path)
    plt.close(fig)
