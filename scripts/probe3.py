#!/usr/bin/env python3
"""Hardening probe 3 (issue 25): bad inputs against every subcommand, each judged by one classifier.

A case is a command line run in its own directory (cwd), holding copies of the fixtures it needs (a demo export,
an int8 export with its calibration.json, a tg-tiny random checkpoint, a data folder, an image, a Triton
repository), set up and then edited by the case. Bad inputs are OK when the command exits 2 with one line on
stderr (`tgedge: error: ...`, no traceback) naming the fragment given (the file, key or option), every file of
the directory is unchanged and nothing new is left. Positive controls are OK when they exit 0 and write only
under their outputs. "either" cases (valid extremes) are OK as a positive control or as a clean refusal.
A few serving cases start one `tgedge serve` and send raw HTTP requests.

    .venv/bin/python scripts/probe3.py [--work DIR] [--json probe3.json] [--only NAME,...] [--no-serve]

Writes every result to --json and prints counts and each BAD case with its command and reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = dict(os.environ, PYTHONPATH=str(ROOT), TGEDGE_NO_COLOR="1")


def tg(*argv, cwd, timeout=300):
    r = subprocess.run([PY, "-m", "tgedge", *map(str, argv)], cwd=cwd, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"fixture failed: tgedge {' '.join(map(str, argv))}: {r.stderr[-2000:]}")
    return r


def build_fixtures(fx: Path) -> None:
    """The expensive inputs, once; cases copy them."""
    fx.mkdir(parents=True, exist_ok=True)
    if (fx / "done").exists():
        return
    tg("data", "shapes", "--split", "eval", "-n", "3", "-o", "data", cwd=fx)
    shutil.copy(fx / "data" / "images" / "000000.png", fx / "image.png")
    tg("export", "demo", "-o", "exp", "--no-check", cwd=fx)
    tg("quantize", "exp", "--precision", "int8", "--calib", "data", "-o", "q8", cwd=fx)
    tg("checkpoint", "random", "--preset", "tg-tiny", "-o", "tiny", cwd=fx)
    tg("triton", "exp", "-o", "repo", cwd=fx)
    (fx / "done").write_text("ok")


# -- setup helpers: each takes the case directory ------------------------------------------------------------
def jedit(rel, fn):
    def apply(d):
        p = d / rel
        v = json.loads(p.read_text())
        fn(v)  # edits in place (its value, e.g. dict.pop's, is not the new content)
        p.write_text(json.dumps(v))
    return apply


def write(rel, data):
    def apply(d):
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():
            p.unlink()
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return apply


def fifo(rel):
    def apply(d):
        p = d / rel
        if p.exists():
            p.unlink()
        os.mkfifo(p)
    return apply


def link(rel, target):
    def apply(d):
        p = d / rel
        if p.is_symlink() or p.exists():
            p.unlink()
        p.symlink_to(target)
    return apply


def mkdir(rel):
    def apply(d):
        p = d / rel
        if p.exists() and not p.is_dir():
            p.unlink()
        p.mkdir(parents=True, exist_ok=True)
    return apply


def truncate(rel, keep):
    def apply(d):
        p = d / rel
        data = p.read_bytes()
        p.write_bytes(data[:keep if keep >= 0 else len(data) // 2])
    return apply


def swap(a, b):
    def apply(d):
        t = d / (a + ".tmp")
        (d / a).rename(t)
        (d / b).rename(d / a)
        t.rename(d / b)
    return apply


def rehash(export):
    """Rewrite an export's checksums to match its files: tampering the manifest agrees with."""
    def apply(d):
        sys.path.insert(0, str(ROOT))
        from tgedge.fileio import sha256_files
        from tgedge.runtime.manifest import graph_fingerprint

        e = d / export
        m = json.loads((e / "manifest.json").read_text())
        for g in m["graphs"].values():
            g["sha256"] = sha256_files([e / g["file"]])
            g["fingerprint"] = graph_fingerprint([e / g["file"]])
        for k, name in m.get("files", {}).items():
            if k in m.get("file_sha256", {}):
                m["file_sha256"][k] = hashlib.sha256((e / name).read_bytes()).hexdigest()
        (e / "manifest.json").write_text(json.dumps(m))
    return apply


def rgba(rel, mode="RGBA", size=(40, 30)):
    def apply(d):
        from PIL import Image
        Image.new(mode, size).save(d / rel)
    return apply


def seq(*fns):
    def apply(d):
        for f in fns:
            f(d)
    return apply


# -- cases -------------------------------------------------------------------------------------------------------
CASES = []


def C(name, cmd, need=(), setup=None, expect="bad", frag=None, out=(), timeout=90, codes=(2,)):
    CASES.append(dict(name=name, cmd=cmd, need=tuple(need), setup=setup, expect=expect, frag=frag, out=tuple(out),
                      timeout=timeout, codes=tuple(codes)))


E = ("exp",)
ED = ("exp", "data")
EI = ("exp", "image.png")
EDI = ("exp", "data", "image.png")
T = ("tiny",)
TI = ("tiny", "image.png")
RUN = "run exp --image image.png --prompt 'what color is the square?' --max-new-tokens 2"
VAL = "validate exp --data data --limit 1 --max-new-tokens 2"
BENCH = "bench exp --runs 1 --warmup 0 --new-tokens 2"

# positive controls
C("ok run export", RUN + " --json", EI, expect="ok")
C("ok run demo torch", "run demo --image image.png --prompt 'what shape?' --max-new-tokens 2", ("image.png",),
  expect="ok")
C("ok inspect export", "inspect exp --json", E, expect="ok")
C("ok inspect graph", "inspect exp/vision.onnx", E, expect="ok")
C("ok validate json", VAL + " --json reports/r.json --markdown reports/r.md", ED, expect="ok", out=("reports",),
  timeout=180)
C("ok quantize fp16", "quantize exp --precision fp16 -o q16", E, expect="ok", out=("q16",), timeout=180)
C("ok triton", "triton exp -o repo2", E, expect="ok", out=("repo2",))
C("ok data", "data shapes -n 2 -o d2", (), expect="ok", out=("d2",))
C("ok checkpoint random", "checkpoint random --preset llava-tiny -o ck", (), expect="ok", out=("ck",))
C("ok presets json", "checkpoint presets --json --dtype fp32", (), expect="ok")
C("ok stats", "checkpoint stats tiny --image image.png --max-new-tokens 2", TI, expect="ok", timeout=120)
C("ok bench json", BENCH + " --json b.json", E, expect="ok", out=("b.json",), timeout=180)
C("ok eval demo", "eval demo --data data --limit 1 --max-new-tokens 2", ("data",), expect="ok")
C("ok export tiny", "export tiny -o te --no-check", T, expect="ok", out=("te",), timeout=180)
C("ok device", "device --json", (), expect="ok")
C("ok quantize int8 reuse calibration", "quantize exp --precision int8 --calibration q8/calibration.json -o q8b",
  ("exp", "q8"), expect="ok", out=("q8b",), timeout=180)

# report files that would replace or land inside an input
C("validate json over samples.jsonl", VAL + " --json data/samples.jsonl", ED, frag="samples.jsonl")
C("validate junit over preprocess.json", VAL + " --junit exp/preprocess.json", ED, frag="preprocess.json")
C("validate markdown over tokenizer", VAL + " --markdown exp/tokenizer.json", ED, frag="tokenizer.json")
C("validate json over its policy", VAL + " --policy p.toml --json p.toml", ED,
  setup=write("p.toml", "[fp32.vision]\nmin_cosine = 0.9\n"), frag="p.toml")
C("validate json = junit", VAL + " --json r.x --junit r.x", ED, frag="r.x")
C("validate json a directory", VAL + " --json outdir", ED, setup=mkdir("outdir"), frag="outdir")
C("validate json new file inside export", VAL + " --json exp/new/r.json", ED, frag="exp")
C("validate markdown inside data images", VAL + " --markdown data/images/r.md", ED, frag="data")
C("validate json via symlink to manifest", VAL + " --json lnk.json", ED,
  setup=link("lnk.json", "exp/manifest.json"), frag="lnk.json")
C("validate json via dotdot into export", VAL + " --json nowhere/../exp/r.json", ED, frag="exp")
C("validate json over reference config", "validate exp --data data --limit 1 --reference tiny --json tiny/config.json",
  ("exp", "data", "tiny"), frag="config.json")
C("bench json over manifest", BENCH + " --json exp/manifest.json", E, frag="manifest.json")
C("bench markdown over its image", BENCH + " --image image.png --markdown image.png", EI, frag="image.png")
C("bench plot over a graph", BENCH + " --plot exp/vision.onnx", E, frag="vision.onnx")
C("bench json over checkpoint config", "bench tiny --runs 1 --warmup 0 --new-tokens 2 --json tiny/config.json", T,
  frag="config.json")
C("bench json into clip dir", "bench tiny --runs 1 --warmup 0 --new-tokens 2 --json tiny/clip/r.json", T,
  frag="clip")
C("bench markdown = json", BENCH + " --json same.txt --markdown same.txt", E, frag="same.txt")
C("loadtest json over samples", "loadtest 127.0.0.1:1 --data data --requests 1 --concurrency 1 --json "
  "data/samples.jsonl", ("data",), frag="samples.jsonl")
C("loadtest plot over an image", "loadtest 127.0.0.1:1 --data data --requests 1 --concurrency 1 --plot "
  "data/images/000000.png", ("data",), frag="000000.png")
C("loadtest json inside baseline", "loadtest 127.0.0.1:1 --data data --baseline exp --requests 1 --concurrency 1 "
  "--json exp/r.json", ED, frag="exp")
C("build timing cache over manifest", "build exp -o eng --timing-cache exp/manifest.json", E, frag="manifest.json",
  codes=(2,))

# -o rules on other commands and combinations
C("quantize -o inside export", "quantize exp --precision fp16 -o exp/q", E, frag="exp")
C("quantize -o inside calib data", "quantize exp --precision int8 --calib data -o data/q", ED, frag="data")
C("quantize -o holds calibration", "quantize exp --precision int8 --calibration c/calibration.json -o c --force",
  E, setup=lambda d: (d.joinpath("c").mkdir(), shutil.copy(FX / "q8" / "calibration.json", d / "c")),
  frag="c")
C("quantize -o symlink to export", "quantize exp --precision fp16 -o lnk --force", E, setup=link("lnk", "exp"),
  frag="lnk")
C("triton -o inside export", "triton exp -o exp/repo", E, frag="exp")
C("triton -o the export", "triton exp -o exp --force", E, frag="exp")
C("triton -o parent of export", "triton sub/exp -o sub --force", (),
  setup=lambda d: shutil.copytree(FX / "exp", d / "sub" / "exp"), frag="sub")
C("triton -o dangling link", "triton exp -o dang", E, setup=link("dang", "nowhere/at/all"), frag="dang")
C("data -o an export", "data shapes -n 2 -o exp", E, frag="exp")
C("data -o a file", "data shapes -n 2 -o f.txt", (), setup=write("f.txt", "mine"), frag="f.txt")
C("export -o inside clip", "export tiny -o tiny/clip/onnx --no-check", T, frag="clip")
C("export -o clip --force", "export tiny -o tiny/clip --no-check --force", T, frag="clip")
C("export -o root", "export demo -o / --no-check --force", (), frag="/")
C("train-demo -o a data folder", "train-demo -o data --vision-steps 1 --answer-steps 1", ("data",), frag="data")
C("build -o inside export", "build exp -o exp/eng", E, frag="exp")
C("checkpoint random -o an export", "checkpoint random --preset tg-tiny -o exp", E, frag="exp")
C("checkpoint random -o under a file", "checkpoint random --preset tg-tiny -o f.txt/ck", (),
  setup=write("f.txt", "x"), frag="f.txt")

# tampered manifests / checksums / swapped files
C("run graph fingerprint null", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["graphs"]["vision"].update(fingerprint=None)), frag="vision")
C("run graph file points at another", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["graphs"]["vision"].update(file="fusion.onnx")), frag="vision")
C("run swapped graphs, checksums rehashed", RUN, EI, setup=seq(swap("exp/vision.onnx", "exp/fusion.onnx"),
  rehash("exp")), frag="vision")
C("inspect swapped graphs, rehashed", "inspect exp", E, setup=seq(swap("exp/vision.onnx", "exp/fusion.onnx"),
  rehash("exp")), frag="vision", codes=(1, 2))
C("triton swapped graphs, rehashed", "triton exp -o r", E, setup=seq(swap("exp/vision.onnx", "exp/fusion.onnx"),
  rehash("exp")), frag="vision")
C("run tokenizer swapped for guide's, rehashed", RUN, EI,
  setup=seq(lambda d: shutil.copy(d / "exp/guide_tokenizer.json", d / "exp/tokenizer.json"), rehash("exp")),
  frag="tokenizer")
C("run preprocess image_size edited, rehashed", RUN, EI,
  setup=seq(jedit("exp/preprocess.json", lambda p: p.update(image_size=32) if "image_size" in p else p.update(
      size=32)), rehash("exp")), frag="preprocess")
C("run preprocess mean edited, rehashed", RUN, EI,
  setup=seq(jedit("exp/preprocess.json", lambda p: [p.update({k: [0.9, 0.9, 0.9]}) for k in list(p)
                                                    if "mean" in k]), rehash("exp")),
  expect="either")
C("run manifest max_context -1", RUN, EI, setup=jedit("exp/manifest.json", lambda m: m.update(max_context=-1)),
  frag="max_context")
C("run manifest max_context string", RUN, EI,
  setup=jedit("exp/manifest.json", lambda m: m.update(max_context="256")), frag="max_context")
C("run manifest max_context 0", RUN, EI, setup=jedit("exp/manifest.json", lambda m: m.update(max_context=0)),
  frag="max_context")
C("inspect manifest opset 99", "inspect exp", E, setup=jedit("exp/manifest.json", lambda m: m.update(opset=99)),
  frag="opset", codes=(1, 2))
C("run manifest dims max < min", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["dims"]["sequence_length"].update(min=300)), frag="sequence_length")
C("validate manifest precision int3", VAL, ED, setup=jedit("exp/manifest.json",
  lambda m: m["graphs"]["vision"].update(precision="int3")), frag="precision")
C("run kv_cache num_layers wrong", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["kv_cache"].update(num_layers=4)), frag="num_layers")
C("run kv_cache mode static on a growing graph", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["kv_cache"].update(mode="static")), frag="kv_cache")
C("run stages without fusion", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m.update(stages=[s for s in m["stages"] if s != "fusion"])), frag="stages")
C("run fusion_family plain", RUN, EI, setup=jedit("exp/manifest.json", lambda m: m.update(fusion_family="plain")),
  frag="fusion_family")
C("run file_sha256 preprocess null", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["file_sha256"].update(preprocess=None)), frag="preprocess")
C("triton file_sha256 missing", "triton exp -o r", E, setup=jedit("exp/manifest.json",
  lambda m: m.pop("file_sha256")), frag="sha256")
C("run files.tokenizer escapes", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["files"].update(tokenizer="../../etc/passwd")), frag="tokenizer")
C("inspect graph file absolute", "inspect exp", E, setup=jedit("exp/manifest.json",
  lambda m: m["graphs"]["vision"].update(file="/etc/passwd")), frag="vision", codes=(1, 2))
C("run manifest is a list", RUN, EI, setup=write("exp/manifest.json", "[1, 2]"), frag="manifest.json")
C("inspect manifest truncated", "inspect exp", E, setup=truncate("exp/manifest.json", 100), frag="manifest.json")
C("validate manifest empty", VAL, ED, setup=write("exp/manifest.json", ""), frag="manifest.json")
C("run manifest_version 2", RUN, EI, setup=jedit("exp/manifest.json", lambda m: m.update(manifest_version=2)),
  frag="manifest version")
C("run decoder vocab_size edited", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["model"]["decoder"].update(vocab_size=60)), frag="vocab_size")
C("run eos_token_id beyond vocab", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["model"].update(eos_token_id=[999])), frag="eos_token_id")
C("run image_token_index beyond vocab", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["model"].update(image_token_index=999)), frag="image_token")
C("run truncated graph --no-verify", RUN + " --no-verify", EI, setup=truncate("exp/vision.onnx", -1),
  frag="vision")
C("inspect random-bytes graph", "inspect g.onnx", (), setup=write("g.onnx", os.urandom(4096)), frag="g.onnx")
C("inspect missing graph", "inspect exp", E, setup=lambda d: (d / "exp/vision.onnx").unlink(), frag="vision",
  codes=(1, 2))
C("validate byte-flipped graph", VAL, ED, setup=lambda d: _flip(d / "exp/decoder.onnx"), frag="decoder")
C("quantize a quantized export", "quantize q8 --precision fp16 -o q", ("q8",), frag="q8")
C("run manifest graphs missing decoder", RUN, EI, setup=jedit("exp/manifest.json",
  lambda m: m["graphs"].pop("decoder")), frag="decoder")


def _flip(p):
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))


# quantize options
Q = "quantize exp -o q "
C("quantize int8 without data", Q + "--precision int8", E, frag="--calib")
C("quantize precision int9", Q + "--precision decoder=int9", E, frag="int9")
C("quantize precision unknown graph", Q + "--precision bogus=fp16", E, frag="bogus")
C("quantize precision empty item", Q + "--precision vision=fp16,,decoder=fp16", E, frag="--precision")
C("quantize precision empty", Q + "--precision ''", E, frag="--precision")
C("quantize fp16 --awq", Q + "--precision fp16 --awq", E, frag="--awq")
C("quantize fp16 --int8-attention", Q + "--precision fp16 --int8-attention", E, frag="--int8-attention")
C("quantize exclude matches nothing", Q + "--precision fp16 --exclude '/nothing/here/*'", E, frag="--exclude")
C("quantize fp16 --method entropy", Q + "--precision fp16 --method entropy", E, frag="--method")
C("quantize smooth 1.5", Q + "--precision int8 --calib data --smooth 1.5", ED, frag="--smooth")
C("quantize smooth nan", Q + "--precision int8 --calib data --smooth nan", ED, frag="--smooth")
C("quantize block-size 48", Q + "--precision int4w --block-size 48", E, frag="--block-size")
C("quantize accuracy-level 7", Q + "--precision int4w --accuracy-level 7", E, frag="--accuracy-level")
C("quantize calibration range nan string", Q + "--precision int8 --calibration c.json", E,
  setup=lambda d: _cal(d, lambda t: t["highest"].update(data=["nan"])), frag="c.json")
C("quantize calibration range 1e7", Q + "--precision int8 --calibration c.json", E,
  setup=lambda d: _cal(d, lambda t: t["highest"].update(data=[1e7])), frag="c.json")
C("quantize calibration of another export", Q + "--precision int8 --calibration c.json", ("exp", "tiny"),
  setup=lambda d: _cal_other(d), frag="c.json", timeout=240)
C("quantize calib empty samples", Q + "--precision int8 --calib data", ED, setup=write("data/samples.jsonl", ""),
  frag="samples.jsonl")
C("quantize calibration a directory", Q + "--precision int8 --calibration cdir", E, setup=mkdir("cdir"),
  frag="cdir")
C("quantize calibration a device", Q + "--precision int8 --calibration dev.json", E,
  setup=link("dev.json", "/dev/zero"), frag="dev.json", timeout=30)
C("quantize --awq without calib", Q + "--precision int4w --awq", E, frag="--calib")


def _cal(d, change):
    shutil.copy(FX / "q8" / "calibration.json", d / "c.json")
    c = json.loads((d / "c.json").read_text())
    g = next(iter(c["graphs"].values()))
    change(next(iter(g["data"].values())))
    (d / "c.json").write_text(json.dumps(c))


def _cal_other(d):
    shutil.copy(FX / "q8" / "calibration.json", d / "c.json")
    c = json.loads((d / "c.json").read_text())
    g = c["graphs"]["decoder"]["data"]
    g["/renamed/tensor_output_0"] = g.pop(next(iter(g)))
    (d / "c.json").write_text(json.dumps(c))


# run options
C("run export --backend torch", RUN + " --backend torch", EI, frag="--backend")
C("run demo --backend onnxruntime", "run demo --image image.png --prompt q --backend onnxruntime",
  ("image.png",), frag="--backend")
C("run export --clip", RUN + " --clip tiny/clip", ("exp", "image.png", "tiny"), frag="--clip")
C("run raw without placeholder", "run exp --image image.png --raw --prompt 'no placeholder' --guide g", EI,
  frag="<image>")
C("run raw two placeholders", "run exp --image image.png --raw --prompt '<image> <image> q' --guide g", EI,
  frag="<image>")
C("run raw TG without guide", "run exp --image image.png --raw --prompt '<image> q'", EI, frag="--guide")
C("run empty guide", RUN + " --guide ''", EI, frag="--guide")
C("run top-k at greedy", RUN + " --top-k 5", EI, frag="--top-k")
C("run top-p at greedy", RUN + " --top-p 0.5", EI, frag="--top-p")
C("run seed at greedy", RUN + " --seed 7", EI, frag="--seed")
C("run temperature 1e308", RUN + " --temperature 1e308", EI, expect="either")
C("run top-p 1e-300", RUN + " --temperature 1 --top-p 1e-300", EI, expect="either")
C("run temperature 1e-300 top-k 1", RUN + " --temperature 1e-300 --top-k 1", EI, expect="either")
C("run max-new-tokens beyond context", RUN.replace("--max-new-tokens 2", "--max-new-tokens 100000"), EI,
  frag="--max-new-tokens", expect="either")
C("run max-context below prompt", RUN + " --max-context 10", EI, frag="context")
C("run image missing", RUN.replace("image.png", "nope.png"), E, frag="nope.png")
C("run image is text", RUN.replace("image.png", "t.png"), E, setup=write("t.png", "hello"), frag="t.png")
C("run image empty", RUN.replace("image.png", "e.png"), E, setup=write("e.png", b""), frag="e.png")
C("run image truncated png", RUN, EI, setup=truncate("image.png", 200), frag="image.png")
C("run image symlink to device", RUN.replace("image.png", "z.png"), E, setup=link("z.png", "/dev/zero"),
  frag="z.png", timeout=30)
C("run image 1x1", RUN.replace("image.png", "one.png"), E, setup=rgba("one.png", "RGB", (1, 1)), expect="either")
C("run image RGBA", RUN, EI, setup=rgba("image.png"), expect="either")
C("run image CMYK jpeg", RUN.replace("image.png", "c.jpg"), E, setup=lambda d: __import__("PIL.Image").Image.new(
  "CMYK", (30, 30)).save(d / "c.jpg"), expect="either")
C("run prompt beyond context", "run exp --image image.png --max-new-tokens 2 --prompt '" + "red " * 2000 + "'", EI,
  frag="context")
C("run max-new-tokens twice", RUN + " --max-new-tokens 3", EI, frag="--max-new-tokens")
C("run backend tensorrt here", RUN + " --backend tensorrt", EI, frag="tensorrt", codes=(2,))
C("run backend onnxruntime-cuda here", RUN + " --backend onnxruntime-cuda", EI, frag="cuda", codes=(2,))
C("run tokenizer is a FIFO --no-verify", RUN + " --no-verify", EI, setup=fifo("exp/tokenizer.json"),
  frag="tokenizer.json", timeout=30)
C("run checkpoint config is a FIFO", "run tiny --image image.png --prompt q --max-new-tokens 2", TI,
  setup=fifo("tiny/config.json"), frag="config.json", timeout=30)

# export
C("export accuracy-level without decoder-weights", "export demo -o e --accuracy-level 0 --no-check", (),
  frag="--accuracy-level")
C("export max-context beyond positions", "export demo -o e --max-context 5000 --no-check", (),
  frag="--max-context")
C("export static cache beyond positions", "export demo -o e --cache static --max-context 100000 --no-check", (),
  frag="--max-context")
C("export config vocab negative", "export tiny -o e --no-check", T, setup=jedit("tiny/config.json",
  lambda c: c.update(vocab_size=-5)), frag="vocab_size")
C("export config hidden_size string", "export tiny -o e --no-check", T, setup=jedit("tiny/config.json",
  lambda c: c.update(hidden_size="896")), frag="hidden_size")
C("export safetensors truncated", "export tiny -o e --no-check", T, setup=truncate("tiny/model.safetensors", -1),
  frag="safetensors")
C("export tokenizer missing", "export tiny -o e --no-check", T,
  setup=lambda d: (d / "tiny/tokenizer.json").unlink(), frag="tokenizer")
C("export tokenizer not json", "export tiny -o e --no-check", T, setup=write("tiny/tokenizer.json", "{not json"),
  frag="tokenizer.json")
C("export clip missing", "export tiny -o e --no-check", T, setup=lambda d: shutil.rmtree(d / "tiny/clip"),
  frag="clip")
C("export nonexistent", "export nothere -o e", (), frag="nothere")
C("export opset word", "export demo -o e --opset abc", (), frag="--opset")
C("export external-data bogus", "export demo -o e --external-data sometimes", (), frag="--external-data")
C("export safetensors a FIFO", "export tiny -o e --no-check", T, setup=fifo("tiny/model.safetensors"),
  frag="model.safetensors", timeout=30)

# validate / policies
C("validate policy missing", VAL + " --policy nope.toml", ED, frag="nope.toml")
C("validate policy unknown precision", VAL + " --policy p.toml", ED, setup=write("p.toml", "[fp64.vision]\n"
  "min_cosine = 0.9\n"), frag="fp64")
C("validate policy misspelt key", VAL + " --policy p.toml", ED, setup=write("p.toml", "[fp32.vision]\n"
  "min_cosin = 0.9\n"), frag="min_cosin")
C("validate policy unknown stage", VAL + " --policy p.toml", ED, setup=write("p.toml", "[fp32.visoin]\n"
  "min_cosine = 0.9\n"), frag="visoin")
C("validate policy bad toml", VAL + " --policy p.toml", ED, setup=write("p.toml", "[fp32.vision\nx=\n"),
  frag="p.toml")
C("validate policy max_kl 1e300", VAL + " --policy p.toml", ED, setup=write("p.toml", "[fp32.decoder]\n"
  "max_kl = 1e300\n"), frag="max_kl")
C("validate policy max_noise_ratio 1e30", VAL + " --policy p.toml", ED, setup=write("p.toml", "[fp32.vision]\n"
  "max_noise_ratio = 1e30\n"), frag="max_noise_ratio")
C("validate policy min_exact_match 0", VAL + " --policy p.toml", ED, setup=write("p.toml", "[fp32.answers]\n"
  "min_exact_match = 0\n"), frag="min_exact_match")
C("validate policy is a directory", VAL + " --policy pd", ED, setup=mkdir("pd"), frag="pd")
C("validate reference missing", VAL + " --reference nothere", ED, frag="nothere")
C("validate backend tensorrt", VAL + " --backend tensorrt", ED, frag="tensorrt")
C("validate max-new-tokens 0", VAL.replace("--max-new-tokens 2", "--max-new-tokens 0"), ED,
  frag="--max-new-tokens")
C("validate data line an array", VAL, ED, setup=write("data/samples.jsonl", "[1, 2]\n"), frag="samples.jsonl")
C("validate data image missing", VAL, ED, setup=lambda d: (d / "data/images/000000.png").unlink(),
  frag="000000.png")
C("validate data empty dir", "validate exp --data dd --limit 1", E, setup=mkdir("dd"), frag="dd")
C("validate samples.jsonl a directory", VAL, ED, setup=seq(lambda d: (d / "data/samples.jsonl").unlink(),
  mkdir("data/samples.jsonl")), frag="samples.jsonl")
C("validate clip on an export", VAL + " --clip tiny/clip", ("exp", "data", "tiny"), frag="--clip")

# inspect
C("inspect nonexistent", "inspect nothere.onnx", (), frag="nothere")
C("inspect a text file", "inspect notes.txt", (), setup=write("notes.txt", "hi"), frag="notes.txt")
C("inspect empty onnx", "inspect e.onnx", (), setup=write("e.onnx", b""), frag="e.onnx")
C("inspect dir without manifest", "inspect dd", (), setup=seq(mkdir("dd"), write("dd/x.txt", "x")), frag="dd")
C("inspect manifest graphs a string", "inspect exp", E, setup=jedit("exp/manifest.json",
  lambda m: m.update(graphs="vision")), frag="graphs")
C("inspect truncated onnx", "inspect exp/decoder.onnx", E, setup=truncate("exp/decoder.onnx", 1000),
  frag="decoder.onnx")
C("inspect graph a FIFO", "inspect exp", E, setup=fifo("exp/vision.onnx"), frag="vision.onnx", timeout=30,
  codes=(1, 2))

# triton
TR = "triton exp -o r "
C("triton instances 0", TR + "--instances 0", E, frag="--instances")
C("triton max-batch 0", TR + "--max-batch 0", E, frag="--max-batch")
C("triton max-batch huge", TR + "--max-batch 1000000000", E, frag="--max-batch")
C("triton queue-delay negative", TR + "--queue-delay-us -1", E, frag="--queue-delay-us")
C("triton max-inflight 0", TR + "--max-inflight 0", E, frag="--max-inflight")
C("triton tensorrt on an export", TR + "--backend tensorrt", E, frag="engine")
C("triton tensorrt max-inflight 8", TR + "--backend tensorrt --max-inflight 8", E, frag="--max-inflight")
C("triton of a data folder", "triton data -o r", ("data",), frag="data")
C("triton preprocess a FIFO", TR, E, setup=fifo("exp/preprocess.json"), frag="preprocess.json", timeout=30)
C("triton instances twice", TR + "--instances 1 --instances 2", E, frag="--instances")

# serve (no server start)
C("serve nonexistent repo", "serve nothere", (), frag="nothere")
C("serve an export", "serve exp", E, frag="exp")
C("serve http-port 70000", "serve repo --http-port 70000", ("repo",), frag="--http-port")
C("serve same ports", "serve repo --http-port 18000 --grpc-port 18000", ("repo",), frag="port")
C("serve timeout 0", "serve repo --timeout 0", ("repo",), frag="--timeout")
C("serve timeout nan", "serve repo --timeout nan", ("repo",), frag="--timeout")
C("serve tritonserver missing", "serve repo --tritonserver ./nope --timeout 10", ("repo",), frag="nope")
# --quiet: without it serve says "starting ..." and echoes the server's log on stderr by design (docs/SERVING.md)
C("serve tritonserver /bin/false", "serve repo --quiet --tritonserver /bin/false --timeout 20 --http-port 18100 "
  "--grpc-port 18101 --metrics-port 18102", ("repo",), frag="tritonserver", codes=(1, 2))
C("serve config.pbtxt a FIFO", "serve repo --timeout 10", ("repo",), setup=fifo("repo/tgedge/config.pbtxt"),
  frag="config.pbtxt", timeout=30)

# client / loadtest (no server)
C("client nothing listening", "client 127.0.0.1:1 --image image.png --prompt q --timeout 5", ("image.png",),
  frag="127.0.0.1:1", codes=(1, 2))
C("client url with scheme http", "client http://127.0.0.1:8001 --image image.png --prompt q", ("image.png",),
  frag="http", codes=(2,))
C("client url port word", "client 127.0.0.1:abc --image image.png --prompt q", ("image.png",), frag="abc")
C("client timeout 0", "client 127.0.0.1:1 --image image.png --prompt q --timeout 0", ("image.png",),
  frag="--timeout")
C("client timeout nan", "client 127.0.0.1:1 --image image.png --prompt q --timeout nan", ("image.png",),
  frag="--timeout")
C("client image missing", "client 127.0.0.1:1 --image nope.png --prompt q", (), frag="nope.png")
# whether the model has a text guide is in its config, on the server: with nothing there the client cannot know (the
# served case, "serve: client raw without guide", checks it refuses before sending)
C("client raw without guide", "client 127.0.0.1:1 --image image.png --raw --prompt '<image> q' --timeout 3",
  ("image.png",), frag="127.0.0.1:1", codes=(1, 2))
LT = "loadtest 127.0.0.1:1 --data data --requests 1 "
C("loadtest concurrency 0", LT + "--concurrency 0", ("data",), frag="--concurrency")
C("loadtest requests 0", LT + "--requests 0", ("data",), frag="--requests")
C("loadtest concurrency word", LT + "--concurrency 1,a", ("data",), frag="--concurrency")
C("loadtest baseline-threads -1", LT + "--baseline-threads -1", ("data",), frag="--baseline-threads")
C("loadtest timeout inf", LT + "--timeout inf", ("data",), frag="--timeout")
C("loadtest remote address", "loadtest 8.8.8.8:8001 --data data --requests 1", ("data",), frag="8.8.8.8")
C("loadtest baseline a data folder", LT + "--concurrency 1 --baseline data", ("data",), frag="data")
C("loadtest baseline-threads without baseline", LT + "--concurrency 1 --baseline-threads 2", ("data",),
  frag="--baseline-threads")

# checkpoint random / stats / presets
CR = "checkpoint random -o ck "
C("random preset unknown", CR + "--preset tg-huge", (), frag="tg-huge")
C("random max-shard-size 0", CR + "--preset tg-tiny --max-shard-size 0", (), frag="--max-shard-size")
C("random max-shard-size word", CR + "--preset tg-tiny --max-shard-size lots", (), frag="--max-shard-size")
C("random max-shard-size 1KB", CR + "--preset tg-tiny --max-shard-size 1KB", (), expect="either", out=("ck",))
C("random outliers -1", CR + "--preset tg-tiny --outliers -1", (), frag="--outliers")
C("random outliers 10^9", CR + "--preset tg-tiny --outliers 1000000000", (), frag="--outliers")
C("random seed -1", CR + "--preset tg-tiny --seed -1", (), frag="--seed")
# the two are independent: flat weights with 4 planted outlier channels per tower (presets_init.apply), reported
C("random outliers with flat init", CR + "--preset tg-tiny --init flat --outliers 4", (), expect="ok", out=("ck",))
C("random preset twice", CR + "--preset tg-tiny --preset llava-tiny", (), frag="--preset")
C("stats nonexistent", "checkpoint stats nothere", (), frag="nothere")
C("stats of an export", "checkpoint stats exp", E, frag="exp")
C("stats image a FIFO", "checkpoint stats tiny --image f.png", T, setup=fifo("f.png"), frag="f.png", timeout=30)
C("stats max-new-tokens 0", "checkpoint stats tiny --max-new-tokens 0", T, frag="--max-new-tokens")
C("stats clip of nothing", "checkpoint stats tiny --clip nothere", T, frag="--clip")
C("stats empty prompt", "checkpoint stats tiny --prompt ' '", T, frag="prompt")
C("stats config a FIFO", "checkpoint stats tiny", T, setup=fifo("tiny/config.json"), frag="config.json",
  timeout=30)
C("presets dtype int8", "checkpoint presets --dtype int8", (), frag="--dtype")

# data / eval / build / train-demo
C("data seed -1", "data shapes -n 2 --seed -1 -o d", (), frag="--seed")
C("data split bogus", "data shapes -n 2 --split holdout -o d", (), frag="--split")
C("data size 23", "data shapes -n 2 --size 23 -o d", (), frag="--size")
C("data n 1.5", "data shapes -n 1.5 -o d", (), frag="-n")
C("eval ablate on an export", "eval exp --data data --limit 1 --ablate fom", ED, frag="--ablate")
C("eval export --backend torch", "eval exp --data data --limit 1 --backend torch", ED, frag="--backend")
C("eval data missing", "eval demo --data nothere", (), frag="nothere")
C("eval clip for demo", "eval demo --data data --limit 1 --clip tiny/clip", ("data", "tiny"), frag="--clip")
C("build graph bogus", "build exp -o eng --graph bogus", E, frag="bogus")
C("build a data folder", "build data -o eng", ("data",), frag="data")
C("train vision-steps -1", "train-demo -o t --vision-steps -1", (), frag="--vision-steps")
C("train plain with gate-strategy", "train-demo -o t --fusion plain --gate-strategy attention_weights "
  "--vision-steps 1 --answer-steps 1", (), frag="--gate-strategy")
C("train gated with --no-tg", "train-demo -o t --fusion gated --no-tg --vision-steps 1 --answer-steps 1", (),
  frag="--no-tg")
# 0 is valid (it freezes the vision tower; --help says so) and then trains in full: a negative scale is the bad input
C("train vision-lr-scale -1", "train-demo -o t --vision-lr-scale -1", (), frag="--vision-lr-scale")


# -- running and judging -----------------------------------------------------------------------------------------
def snapshot(d: Path) -> dict:
    snap = {}
    for root, dirs, files in os.walk(d, followlinks=False):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(d))
            if p.is_symlink():
                snap[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                snap[rel] = "dir"
            elif p.is_file():
                snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                snap[rel] = "special"
    return snap


def judge(case, rc, err, before, after, timed_out, wall):
    reasons = []
    if timed_out:
        return ["hang: no exit within %ds" % case["timeout"]]
    changed = [k for k in before if after.get(k) != before[k]]
    if changed:
        reasons.append("input changed or removed: " + ", ".join(changed[:5]))
    new = [k for k in after if k not in before]
    allowed = lambda k: any(k == o or k.startswith(o + "/") for o in case["out"])  # noqa: E731
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("  ")]  # indented: progress steps
    if case["expect"] == "ok" or (case["expect"] == "either" and rc == 0):
        if rc != 0:
            reasons.append(f"positive control exit {rc}: {lines[-1] if lines else ''}"[:300])
        stray = [k for k in new if not allowed(k)]
        if stray:
            reasons.append("wrote outside its outputs: " + ", ".join(stray[:5]))
        if "Traceback" in err:
            reasons.append("traceback on stderr")
        return reasons
    if new:
        reasons.append("left output: " + ", ".join(new[:5]))
    if "Traceback" in err:
        reasons.append("traceback")
    codes = case["codes"] if case["expect"] == "bad" else (1, 2)
    if rc not in codes:
        reasons.append(f"exit {rc} (want {'/'.join(map(str, codes))})"
                       + (": " + lines[-1][:200] if lines else ""))
    if rc == 1 and case["cmd"].startswith("inspect") and 1 in codes:
        pass  # inspect's report (stdout) says which graph does not match
    elif len(lines) != 1:
        reasons.append(f"{len(lines)} lines on stderr" + (": " + " | ".join(lines[-3:])[:300] if lines else ""))
    elif not lines[0].startswith("tgedge: error:"):
        reasons.append("not a tgedge error line: " + lines[0][:200])
    elif case["frag"] and case["frag"].lower() not in lines[0].lower():
        reasons.append(f"message does not name {case['frag']!r}: {lines[0][:250]}")
    return reasons


def run_case(case, work: Path):
    d = work / "cases" / "".join(c if c.isalnum() else "_" for c in case["name"])
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for n in case["need"]:
        src = FX / n
        (shutil.copytree if src.is_dir() else shutil.copy)(src, d / n, **({"symlinks": True} if src.is_dir() else {}))
    if case["setup"]:
        case["setup"](d)
    before = snapshot(d)
    argv = shlex.split(case["cmd"])
    t0 = time.time()
    timed_out = False
    p = subprocess.Popen([PY, "-m", "tgedge", *argv], cwd=d, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True, errors="replace", start_new_session=True)
    try:
        out, err = p.communicate(timeout=case["timeout"])
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
    wall = time.time() - t0
    after = snapshot(d)
    reasons = judge(case, p.returncode, err, before, after, timed_out, wall)
    lines = [x for x in err.splitlines() if x.strip()]
    return dict(name=case["name"], cmd="tgedge " + case["cmd"][:400], expect=case["expect"], rc=p.returncode,
                wall_s=round(wall, 1), verdict="BAD" if reasons else "OK", reasons=reasons,
                stderr_tail=lines[-3:], dir=str(d))


# -- serving: one server, raw HTTP ------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=30):
    req = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def serving_cases(work: Path):
    results = []
    d = work / "serve"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    shutil.copytree(FX / "repo", d / "repo", symlinks=True)
    shutil.copytree(FX / "data", d / "data")
    shutil.copy(FX / "image.png", d / "image.png")
    hp, gp, mp = free_port(), free_port(), free_port()
    p = subprocess.Popen([PY, "-m", "tgedge", "serve", "repo", "--http-port", str(hp), "--grpc-port", str(gp),
                          "--metrics-port", str(mp), "--quiet", "--timeout", "240"], cwd=d, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{hp}"

    def add(name, ok, reason, cmd):
        results.append(dict(name=name, cmd=cmd, expect="serve", rc=None, wall_s=None, verdict="OK" if ok else "BAD",
                            reasons=[] if ok else [reason], stderr_tail=[], dir=str(d)))

    t0 = time.time()
    ready = False
    while time.time() - t0 < 260 and p.poll() is None:
        try:
            if http("GET", base + "/v2/health/ready", timeout=2)[0] == 200:
                ready = True
                break
        except OSError:
            pass
        time.sleep(2)
    if not ready:
        err = p.stderr.read() if p.poll() is not None else ""
        add("serve starts", False, f"not ready after {time.time() - t0:.0f}s: {err[-300:]}", "tgedge serve repo")
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        return results
    add("serve starts", True, "", "tgedge serve repo")
    try:
        def infer(model, inputs):
            return http("POST", f"{base}/v2/models/{model}/infer", {"inputs": inputs})

        def clean_error(name, status, body, frag):
            bad = []
            if status < 400:
                bad.append(f"HTTP {status} for a bad request")
            if "Traceback" in body or 'File "' in body:
                bad.append("stack frames in the error")
            if frag and frag.lower() not in body.lower():
                bad.append(f"error does not name {frag!r}")
            add(name, not bad, "; ".join(bad) + ": " + body[:300], f"POST /v2/models/.../infer ({name})")

        s, b = infer("text_guide", [{"name": "input_ids", "datatype": "INT64", "shape": [1, 4],
                                     "data": [1, 5, 1000000, 2]}])
        clean_error("http text_guide id beyond vocab", s, b, "input_ids")
        s, b = infer("text_guide", [{"name": "input_ids", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}])
        clean_error("http text_guide wrong dtype", s, b, "input_ids")
        s, b = infer("vision", [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 3, 8, 8],
                                 "data": [0.0] * 192}])
        clean_error("http vision wrong shape", s, b, "pixel_values")
        s, b = infer("text_guide", [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [-7, 1]}])
        clean_error("http text_guide negative id", s, b, "input_ids")
        s, b = http("GET", f"{base}/v2/models/tgedge/config")
        add("http entry config", s == 200, f"HTTP {s}: {b[:200]}", "GET /v2/models/tgedge/config")
        url = f"127.0.0.1:{gp}"
        for case in (
            dict(name="serve: client answers", cmd=f"client {url} --image image.png --prompt 'what color?' "
                 "--max-new-tokens 2 --json", expect="ok"),
            dict(name="serve: client model bogus", cmd=f"client {url} --image image.png --prompt q --model bogus",
                 frag="bogus"),
            dict(name="serve: client image a text file", cmd=f"client {url} --image data/samples.jsonl --prompt q",
                 frag="image", codes=(1, 2)),
            dict(name="serve: client prompt beyond context", cmd=f"client {url} --image image.png --prompt '"
                 + "red " * 2000 + "'", frag="context", codes=(1, 2)),
            dict(name="serve: client raw without guide", cmd=f"client {url} --image image.png --raw --prompt "
                 "'<image> q'", frag="--guide"),
            dict(name="serve: client temperature 1e-300", cmd=f"client {url} --image image.png --prompt q "
                 "--temperature 1e-300 --max-new-tokens 2", expect="either"),
            dict(name="serve: loadtest json over samples", cmd=f"loadtest {url} --data data --requests 1 "
                 "--concurrency 1 --max-new-tokens 2 --json data/samples.jsonl", frag="samples.jsonl"),
            dict(name="serve: loadtest ok", cmd=f"loadtest {url} --data data --requests 2 --concurrency 1 "
                 "--max-new-tokens 2 --json lt/r.json", expect="ok", out=("lt",)),
        ):
            full = dict(need=(), setup=None, expect="bad", frag=None, out=(), timeout=120, codes=(2,))
            full.update(case)
            before = snapshot(d)
            r = subprocess.run([PY, "-m", "tgedge", *shlex.split(full["cmd"])], cwd=d, env=ENV, capture_output=True,
                               text=True, timeout=full["timeout"])
            after = snapshot(d)
            ignore = {k for k in after if k.startswith("repo/") and "__pycache__" in k}
            for k in ignore:
                after.pop(k, None)
                before.pop(k, None)
            reasons = judge(full, r.returncode, r.stderr, before, after, False, 0)
            lines = [x for x in r.stderr.splitlines() if x.strip()]
            results.append(dict(name=full["name"], cmd="tgedge " + full["cmd"][:300], expect=full["expect"],
                                rc=r.returncode, wall_s=None, verdict="BAD" if reasons else "OK", reasons=reasons,
                                stderr_tail=lines[-3:], dir=str(d)))
        s, b = http("GET", base + "/v2/health/ready")
        add("serve still ready after bad requests", s == 200, f"HTTP {s}", "GET /v2/health/ready")
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = "hang"
        add("serve SIGTERM exits 143", rc == 143, f"exit {rc}", "kill -TERM tgedge serve")
    return results


def main():
    global FX
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tgedge-probe3")
    ap.add_argument("--json", type=Path, default=Path("probe3.json"))
    ap.add_argument("--only", default="", help="comma-separated case names (substring match)")
    ap.add_argument("--no-serve", action="store_true")
    a = ap.parse_args()
    FX = a.work / "fixtures"
    t0 = time.time()
    build_fixtures(FX)
    demo_before = snapshot(ROOT / "tgedge" / "demo_model")
    only = [x for x in a.only.split(",") if x]
    cases = [c for c in CASES if not only or any(o in c["name"] for o in only)]
    fx_before = snapshot(FX)
    results = []
    for i, case in enumerate(cases, 1):
        try:
            r = run_case(case, a.work)
        except Exception as e:  # the probe's own setup failing is reported, not hidden
            r = dict(name=case["name"], cmd="tgedge " + case["cmd"], expect=case["expect"], rc=None, wall_s=None,
                     verdict="BAD", reasons=[f"probe setup failed: {type(e).__name__}: {e}"], stderr_tail=[])
        results.append(r)
        print(f"[{i}/{len(cases)}] {r['verdict']} {r['name']} ({r['wall_s']}s)"
              + (": " + "; ".join(r["reasons"]) if r["reasons"] else ""), flush=True)
    if not a.no_serve and (not only or any("serve" in o or "http" in o for o in only)):
        for r in serving_cases(a.work):
            results.append(r)
            print(f"[serve] {r['verdict']} {r['name']}" + (": " + "; ".join(r["reasons"]) if r["reasons"] else ""),
                  flush=True)
    for label, before, where in (("fixtures", fx_before, FX), ("demo model", demo_before,
                                                              ROOT / "tgedge" / "demo_model")):
        after = snapshot(where)
        if after != before:
            results.append(dict(name=f"{label} unchanged", cmd="(whole run)", expect="-", rc=None, wall_s=None,
                                verdict="BAD", reasons=[f"{label} changed"], stderr_tail=[]))
    bad = [r for r in results if r["verdict"] == "BAD"]
    summary = dict(cases=len(results), ok=len(results) - len(bad), bad=len(bad),
                   positive=sum(r["expect"] == "ok" for r in results), wall_s=round(time.time() - t0))
    a.json.write_text(json.dumps(dict(summary=summary, results=results), indent=1))
    print(f"\n{summary['cases']} cases ({summary['positive']} positive controls): {summary['ok']} OK, "
          f"{summary['bad']} BAD, {summary['wall_s']} s; results in {a.json}")
    for r in bad:
        print(f"BAD {r['name']}\n    {r['cmd'][:300]}\n    " + "; ".join(r["reasons"]))
    return 1 if bad else 0


FX = Path()
if __name__ == "__main__":
    sys.exit(main())
