"""Real size serves: an export (or engine directory) through `tgedge triton` and the real `tritonserver`
(`tgedge serve`), each sample's answer from `tgedge client` against the same question answered by the
single-process runtime (what `tgedge run` gives), greedy.

    python scripts/serve_check.py EXPORT --data DIR [--samples 2] [--max-new-tokens 16] [--json F] [--work DIR]

Each sample is asked twice: with its image and text-only (`--no-image`). Prints one JSON line: per sample the
tokens equal or not, the server's load time, and the repository's note on how the entry model decodes. Exit 0
when every answer equals the runtime's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tgedge.data.folder import read_folder
from tgedge.runtime.pipeline import Pipeline


def reference(export: str, asks: list[tuple[str | None, str]], n: int) -> list[list[int]]:
    with Pipeline(export) as pipe:
        out = []
        for image, prompt in asks:
            opts = pipe.options(max_new_tokens=n)
            out.append(list(pipe.answer(image, prompt, opts).tokens))  # image None: the question alone
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export")
    ap.add_argument("--data", required=True)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--json", metavar="F")
    ap.add_argument("--work", metavar="DIR", help="where the repository is written (default: a temporary folder)")
    ap.add_argument("--grpc-port", type=int, default=8101)
    args = ap.parse_args()
    samples = read_folder(args.data)[:args.samples]
    asks = [(str(s.image), s.prompt) for s in samples] + [(None, s.prompt) for s in samples]
    start = time.perf_counter()
    ref = reference(args.export, asks, args.max_new_tokens)
    ref_s = time.perf_counter() - start
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_check_"))
    repo = work / "repo"
    triton = subprocess.run(["tgedge", "triton", args.export, "-o", str(repo), "--force", "--json"],
                            capture_output=True, text=True)
    if triton.returncode:
        print(triton.stderr, file=sys.stderr)
        return triton.returncode
    decoding = json.loads(triton.stdout)["models"]["tgedge"]
    log = open(work / "serve.log", "w")
    start = time.perf_counter()
    server = subprocess.Popen(["tgedge", "serve", str(repo), "--quiet", "--grpc-port", str(args.grpc_port),
                               "--http-port", str(args.grpc_port - 1), "--metrics-port", str(args.grpc_port + 1),
                               "--timeout", "900"], stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        while "ready:" not in (work / "serve.log").read_text():
            if server.poll() is not None:
                print((work / "serve.log").read_text()[-3000:], file=sys.stderr)
                return 1
            time.sleep(1)
        load_s = time.perf_counter() - start
        url = f"127.0.0.1:{args.grpc_port}"
        for (image, prompt), want in zip(asks, ref):
            cmd = ["tgedge", "client", url, "--prompt", prompt, "--max-new-tokens", str(args.max_new_tokens),
                   "--json", "--timeout", "600"] + (["--image", image] if image else ["--no-image"])
            got = subprocess.run(cmd, capture_output=True, text=True)
            if got.returncode:
                rows.append({"image": bool(image), "error": got.stderr.strip()[-500:]})
                continue
            tokens = json.loads(got.stdout)["tokens"]
            rows.append({"image": bool(image), "tokens_equal": tokens == want, "tokens": len(tokens)})
    finally:
        server.terminate()
        server.wait(120)
    ok = all(r.get("tokens_equal") for r in rows)
    report = {"export": args.export, "decoding": decoding, "server_ready_s": round(load_s, 1),
              "reference_s": round(ref_s, 1), "asks": rows, "all_equal": ok}
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
