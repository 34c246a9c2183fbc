"""Bad inputs on the command line, table-driven: each row is argv, the exit code, and a fragment of the one line
printed (docs/ERRORS.md). Then: no command deletes or overwrites a file tgedge did not write."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import tiny
from tgedge.cli import main
from tgedge.export.onnx_export import newest_opset
from tgedge.fileio import MARKER


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """One tiny checkpoint, images, data folders and broken variants, shared by every row."""
    root = tmp_path_factory.mktemp("bad")
    ckpt = root / "ckpt"
    ckpt.mkdir()
    tiny.hf_llava(ckpt)
    image = tiny.test_image(root / "image.png")
    (root / "secret.png").write_bytes(image.read_bytes())

    def data_folder(name, lines):
        d = root / name
        (d / "images").mkdir(parents=True)
        shutil.copy(image, d / "images" / "a.png")
        (d / "images" / "link.png").symlink_to(root / "secret.png")
        (d / "samples.jsonl").write_bytes(b"".join(x if isinstance(x, bytes) else (json.dumps(x).encode() + b"\n")
                                                   for x in lines))
        return d

    good = {"image": "images/a.png", "prompt": "what color?", "answer": "red", "type": "color"}
    data = data_folder("data", [good])

    def variant(name, change):
        d = root / name
        shutil.copytree(ckpt, d)
        change(d)
        return d

    def edit_json(name, change):
        def apply(d):
            cfg = json.loads((d / name).read_text())
            change(cfg)
            (d / name).write_text(json.dumps(cfg))
        return apply

    def nan_weight(d):
        state = load_file(str(d / "model.safetensors"))
        next(v for k, v in state.items() if k.endswith("linear_1.weight"))[0, 0] = float("inf")
        save_file(state, str(d / "model.safetensors"))

    def escaping_index(d):
        (d / "model.safetensors").rename(root / "outside.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))

    def config_is_a_directory(d):
        (d / "config.json").unlink()
        (d / "config.json").mkdir()

    def config_loop(d):
        (d / "config.json").unlink()
        (d / "config.json").symlink_to(d / "config.json")

    clip = tiny.clip_dir(root / "clip")
    guide_swapped = tiny.original_tg_checkpoint(root / "guide_swapped", clip)
    shutil.copy(clip / "tokenizer.json", guide_swapped / "tokenizer.json")  # the decoder's, replaced by the guide's

    def entry_without_stage(name):  # a repository whose entry model calls a stage that is not there
        repo = root / name
        (repo / "tgedge").mkdir(parents=True)
        (repo / "tgedge" / "config.pbtxt").write_text(
            'name: "tgedge"\nbackend: "python"\nparameters { key: "bls_stages" value { string_value: "vision" } }\n')
        return repo

    def fifo_config(repo):  # a stage model whose config.pbtxt is a FIFO
        (repo / "vision").mkdir()
        os.mkfifo(repo / "vision" / "config.pbtxt")
        return repo

    def policy(name, text):
        (root / f"{name}.toml").write_text(text)
        return root / f"{name}.toml"

    policies = {name: policy(name, text) for name, text in {
        "cosine_15": "[fp32.vision]\nmin_cosine = 1.5\n", "cosine_m1": "[fp32.vision]\nmin_cosine = -1\n",
        "top1_0": "[fp32.decoder]\nmin_top1 = 0\n", "kl_inf": "[fp16.decoder]\nmax_kl = inf\n",
        "bool": "[fp16.decoder]\nmax_kl = true\n", "negative": "[fp16.embed]\nmax_rel = -0.1\n",
        "text": "[int8.decoder]\nmin_top1 = \"high\"\n", "not_a_section": "[fp16]\ndecoder = 3\n",
        "drop_100": "[int8.accuracy]\nmax_drop = 100\n", "drop_1000": "[int8.accuracy]\nmax_drop = 1000.0\n",
        "noise_1e30": "[fp32.vision]\nmax_noise_ratio = 1e30\n", "rel_1": "[fp16.embed]\nmax_rel = 1\n",
        "rel_l2_2": "[fp16.vision]\nmax_rel_l2 = 2.0\n", "abs_1e9": "[fp32.embed]\nmax_abs = 1e9\n",
        "cosine_0": "[int8.fusion]\nmin_cosine = 0\n"}.items()}
    fifo = root / "fifo.png"
    os.mkfifo(fifo)  # reading it would block until something writes
    fifo_data = data_folder("fifo_data", [{**good, "image": "images/pipe.png"}])
    os.mkfifo(fifo_data / "images" / "pipe.png")
    fifo_jsonl = root / "fifo_jsonl"
    fifo_jsonl.mkdir()
    for name in ("samples.jsonl", "policy.toml", "calibration.json", "graph.onnx"):  # every file tgedge reads
        os.mkfifo((fifo_jsonl if name == "samples.jsonl" else root) / name)
    corrupt = data_folder("corrupt", [good])
    (corrupt / "images" / "a.png").write_bytes(b"not a png at all")
    loop = root / "loop"
    loop.symlink_to(loop)
    dangling = root / "dangling"
    dangling.symlink_to(root / "nowhere" / "at" / "all")
    strip = root / "strip.png"
    Image.new("RGB", (1, 60000)).save(strip)  # 60000 pixels; padded to a square, 3.6 billion
    grey16 = root / "grey16.png"
    Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)).save(grey16)
    return SimpleNamespace(
        root=root, ckpt=ckpt, image=image, data=data, grey16=grey16, strip=strip, policies=policies, fifo=fifo,
        fifo_data=fifo_data, fifo_jsonl=fifo_jsonl, corrupt=corrupt, loop=loop, dangling=dangling,
        no_stage=entry_without_stage("no_stage"), fifo_config=fifo_config(entry_without_stage("fifo_config")),
        guide_swapped=guide_swapped, clip=clip,
        bomb=big_png_header(root / "bomb.png", 20000, 20000),
        not_utf8=data_folder("not_utf8", [good, b'{"image": "images/a.png", "prompt": "caf\xe9"}\n']),
        up=data_folder("up", [{**good, "image": "../secret.png"}]),
        absolute=data_folder("absolute", [{**good, "image": str(root / "secret.png")}]),
        symlink=data_folder("symlink", [{**good, "image": "images/link.png"}]),
        answer_type=data_folder("answer_type", [{**good, "answer": 3}]),
        empty_prompt=data_folder("empty_prompt", [{**good, "prompt": "  "}]),
        wrong_types=variant("wrong_types", edit_json("config.json", lambda c: c["text_config"].update(
            num_hidden_layers=2.5, rope_theta=float("inf")))),
        feature_layer=variant("feature_layer", edit_json("config.json", lambda c: c.update(vision_feature_layer=100))),
        heads=variant("heads", edit_json("config.json", lambda c: c["vision_config"].update(num_attention_heads=3))),
        std0=variant("std0", edit_json("processor_config.json", lambda c: c["image_processor"].update(image_std=[0, 0, 0]))),
        nan=variant("nan", nan_weight),
        index=variant("index", escaping_index),
        config_dir=variant("config_dir", config_is_a_directory),
        config_loop=variant("config_loop", config_loop),
    )


def big_png_header(path, width, height):
    from test_preprocess import big_png_header as make

    return make(path, width, height)


def run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def RUN(w, *extra, ckpt=None, image=None, prompt="what color?"):
    return ["run", ckpt or w.ckpt, "--image", image or w.image, "--prompt", prompt, "--max-new-tokens", "2", *extra]


ROWS = [
    # numeric options: finite, sign, bounds, at parse time
    ("temperature nan", lambda w: RUN(w, "--temperature", "nan"), "argument --temperature: must be a finite number >= 0"),
    ("temperature inf", lambda w: RUN(w, "--temperature", "inf"), "must be a finite number >= 0, got 'inf'"),
    ("temperature < 0", lambda w: RUN(w, "--temperature", "-1"), "argument --temperature: must be >= 0, got -1"),
    ("top-p 0", lambda w: RUN(w, "--top-p", "0"), "argument --top-p: must be in (0, 1], got 0"),
    ("top-p > 1", lambda w: RUN(w, "--top-p", "1.5"), "argument --top-p: must be in (0, 1], got 1.5"),
    ("top-k < 0", lambda w: RUN(w, "--top-k", "-1"), "argument --top-k: must be >= 0, got -1"),
    ("seed < 0", lambda w: RUN(w, "--seed", "-3"), "argument --seed: must be in [0, 4294967295], got -3"),
    ("seed word", lambda w: RUN(w, "--seed", "one"), "argument --seed: expected an integer in [0, 4294967295], got 'one'"),
    ("max-new-tokens 0", lambda w: RUN(w, "--max-new-tokens", "0"), "argument --max-new-tokens: must be >= 1, got 0"),
    ("max-context 0", lambda w: RUN(w, "--max-context", "0"), "argument --max-context: must be >= 1, got 0"),
    ("size 100000", lambda w: ["data", "shapes", "--size", "100000", "-o", w.root / "x"],
     "argument --size: must be in [24, 4096], got 100000"),
    ("count 0", lambda w: ["data", "shapes", "-n", "0", "-o", w.root / "x"],
     "argument -n/--count: must be in [1, 1000000], got 0"),
    ("count 10^12", lambda w: ["data", "shapes", "-n", str(10 ** 12), "-o", w.root / "x"],
     "argument -n/--count: must be in [1, 1000000], got 1000000000000"),
    ("eval limit -1", lambda w: ["eval", w.ckpt, "--data", w.data, "--limit", "-1"], "argument --limit: must be >= 1, got -1"),
    ("opset 99", lambda w: ["export", w.ckpt, "-o", w.root / "e", "--opset", "99"], "argument --opset: must be in [14, "),
    ("opset beyond the exporter", lambda w: ["export", w.ckpt, "-o", w.root / "e", "--opset", str(newest_opset() + 1)],
     f"argument --opset: must be in [14, {newest_opset()}], got {newest_opset() + 1}"),
    ("opset 11", lambda w: ["export", w.ckpt, "-o", w.root / "e", "--opset", "11"], "argument --opset: must be in [14, "),
    ("export max-context 0", lambda w: ["export", w.ckpt, "-o", w.root / "e", "--max-context", "0"],
     "argument --max-context: must be >= 1, got 0"),
    ("calib-limit 0", lambda w: ["quantize", w.root, "--precision", "int8", "-o", w.root / "q", "--calib-limit", "0"],
     "argument --calib-limit: must be >= 1"),
    ("calib with calibration", lambda w: ["quantize", w.root, "--precision", "int8", "-o", w.root / "q", "--calib",
                                          w.data, "--calibration", w.root / "calibration.json"],
     "argument --calibration: not allowed with argument --calib"),
    ("workspace 0", lambda w: ["build", w.root, "-o", w.root / "b", "--workspace", "0"],
     "argument --workspace: must be in [1, 1048576], got 0"),
    ("validate limit 0", lambda w: ["validate", w.root, "--data", w.data, "--limit", "0"], "argument --limit: must be >= 1"),
    ("bench runs 0", lambda w: ["bench", w.ckpt, "--runs", "0"], "argument --runs: must be in [1, 100000], got 0"),
    ("bench new-tokens 1", lambda w: ["bench", w.ckpt, "--new-tokens", "1"], "argument --new-tokens: must be >= 2, got 1"),
    ("train lr nan", lambda w: ["train-demo", "-o", w.root / "t", "--lr", "nan"], "argument --lr: must be a finite number > 0"),
    ("train batch 0", lambda w: ["train-demo", "-o", w.root / "t", "--batch", "0"], "argument --batch: must be in [1, 4096]"),
    ("client max-new-tokens 2^31", lambda w: ["client", "127.0.0.1:1", "--image", w.image, "--prompt", "q",
                                              "--max-new-tokens", "3000000000"],
     "argument --max-new-tokens: must be in [1, 2147483647], got 3000000000"),
    ("loadtest top-k 2^31", lambda w: ["loadtest", "127.0.0.1:1", "--data", w.data, "--top-k", str(2 ** 31)],
     "argument --top-k: must be in [0, 2147483647], got 2147483648"),
    ("unknown option", lambda w: RUN(w, "--bogus"), "unrecognized arguments: --bogus"),
    ("missing option", lambda w: ["run", w.ckpt], "the following arguments are required: --image, --prompt"),
    # a single-value option given twice, options that would be ignored, lists with an empty or repeated item
    ("prompt twice", lambda w: RUN(w, "--prompt", "b"),
     "argument --prompt: given twice (--prompt 'what color?', then --prompt 'b'): give it once"),
    ("raw prompt, one marker for two images", lambda w: RUN(w, "--image", w.image, "--raw",
                                                            prompt="USER: <image>\nwhat? ASSISTANT:"),
     "raw prompt has one <image> marker for 2 images: it needs one per image, in the images' order"),
    ("two markers for three images", lambda w: RUN(w, "--image", w.image, "--image", w.image,
                                                   prompt="<image> <image> what color?"),
     "prompt has 2 <image> placeholders; 3 images take 3 (or none)"),
    ("bench image twice", lambda w: ["bench", w.ckpt, "--image", w.image, "--image", w.image],
     "argument --image: given twice (--image "),
    ("client conversation twice", lambda w: ["client", "127.0.0.1:1", "--conversation", "a", "--conversation", "b",
                                             "--prompt", "q"], "argument --conversation: given twice (--conversation "),
    ("-o twice", lambda w: ["data", "shapes", "-n", "1", "-o", w.root / "x", "--output", w.root / "y"],
     "argument -o/--output: given twice (-o "),
    ("limit twice", lambda w: ["eval", w.ckpt, "--data", w.data, "--limit", "1", "--limit", "2"],
     "argument --limit: given twice (--limit 1, then --limit 2): give it once"),
    ("clip a checkpoint does not use", lambda w: RUN(w, "--clip", w.clip),
     "is a hf checkpoint with its vision tower inside; --clip is for original-layout (TG-LLaVA repository)"),
    ("export clip it does not use", lambda w: ["export", w.ckpt, "-o", w.root / "e", "--clip", w.clip],
     "is a hf checkpoint with its vision tower inside; --clip is for original-layout"),
    ("block-size without decoder-weights", lambda w: ["export", w.ckpt, "-o", w.root / "e", "--block-size", "32"],
     "--block-size sets the int4w/int8w decoder's MatMulNBits blocks: it needs --decoder-weights"),
    ("bench no-image with image", lambda w: ["bench", w.ckpt, "--no-image", "--image", w.image, "--prompt-tokens", "8"],
     "--no-image runs text-only prompts: it cannot take --image too"),
    # probe 3: reports that name one file, sampling options at greedy
    ("bench reports one file", lambda w: ["bench", w.ckpt, "--json", w.root / "r.txt", "--markdown", w.root / "r.txt"],
     "--json and --markdown both name"),
    ("loadtest reports one file", lambda w: ["loadtest", "127.0.0.1:1", "--data", w.data, "--json", w.root / "r.png",
                                             "--plot", w.root / "r.png"], "--json and --plot both name"),
    ("top-k at greedy", lambda w: RUN(w, "--top-k", "5"), "--top-k shapes sampling, and at --temperature 0"),
    ("client seed at greedy", lambda w: ["client", "127.0.0.1:1", "--image", w.image, "--prompt", "q", "--seed", "3"],
     "--seed shapes sampling, and at --temperature 0"),
    ("compare torch twice", lambda w: ["bench", w.ckpt, "--compare", "torch,torch"],
     "argument --compare: 'torch,torch': torch given twice in the list of peers"),
    ("concurrency empty item", lambda w: ["loadtest", "127.0.0.1:1", "--data", w.data, "--concurrency", "1,,2"],
     "argument --concurrency: '1,,2': an empty item in the comma-separated list"),
    ("baseline-threads without baseline", lambda w: ["loadtest", "127.0.0.1:1", "--data", w.data,
                                                     "--baseline-threads", "2"],
     "--baseline-threads sets the --baseline loop's threads: it needs --baseline"),
    ("baseline not an export", lambda w: ["loadtest", "127.0.0.1:1", "--data", w.data, "--baseline", w.data],
     "not an export (no manifest.json) nor a model repository with tgedge/1/export"),
    # prompts
    ("empty prompt", lambda w: RUN(w, prompt=""), "argument --prompt: must not be empty"),
    ("blank prompt", lambda w: RUN(w, prompt=" \n "), "argument --prompt: must not be empty"),
    ("non-UTF-8 prompt", lambda w: RUN(w, prompt="caf\udce9"), "argument --prompt: not valid UTF-8 text (byte b'\\xe9'"),
    ("image placeholder only", lambda w: RUN(w, prompt="<image>"), "empty prompt"),
    # images
    ("decompression bomb", lambda w: RUN(w, image=w.bomb), "bomb.png: image is 20000x20000 (400 Mpx), over the limit of 179 Mpx"),
    ("padded past the pixel limit", lambda w: RUN(w, ckpt="demo", image=w.strip),
     "image is 1x60000; this model pads it to a square, 60000x60000 (3600 Mpx), over the limit of 179 Mpx"),
    ("image is a directory", lambda w: RUN(w, image=w.root), "is a directory, not an image"),
    ("image is a FIFO", lambda w: RUN(w, image=w.fifo), "fifo.png: is a FIFO (named pipe), not an image"),
    ("image is a device", lambda w: RUN(w, image="/dev/zero"), "/dev/zero: is a character device, not an image"),
    ("client image is a FIFO", lambda w: ["client", "127.0.0.1:1", "--image", w.fifo, "--prompt", "q"],
     "fifo.png: is a FIFO (named pipe), not an image"),
    ("data image is a FIFO", lambda w: ["eval", w.ckpt, "--data", w.fifo_data],
     "samples.jsonl:1: image images/pipe.png is a FIFO (named pipe), not an image"),
    # every other file tgedge reads: a FIFO would block, a device never end
    ("samples.jsonl is a FIFO", lambda w: ["eval", w.ckpt, "--data", w.fifo_jsonl],
     "samples.jsonl: is a FIFO (named pipe), not a data file"),
    ("policy is a FIFO", lambda w: ["validate", w.root, "--data", w.data, "--policy", w.root / "policy.toml"],
     "policy.toml: is a FIFO (named pipe), not a policy file"),
    ("onnx is a FIFO", lambda w: ["inspect", w.root / "graph.onnx"],
     "graph.onnx: is a FIFO (named pipe), not a graph file"),
    ("inspect a device", lambda w: ["inspect", "/dev/zero"], "/dev/zero: is a character device, not a graph file"),
    # checkpoints
    ("config types", lambda w: RUN(w, ckpt=w.wrong_types),
     "text_config.num_hidden_layers must be an integer >= 1 (got 2.5); text_config.rope_theta must be a finite number > 0"),
    ("feature layer", lambda w: RUN(w, ckpt=w.feature_layer),
     "feature_layer/config.json: the vision feature layer (vision_feature_layer, mm_vision_select_layer) 100 is"),
    ("serve host", lambda w: ["serve", w.no_stage, "--host", "999.1.1.1"],
     "argument --host: '999.1.1.1' is not an IP address or a host name"),
    ("heads", lambda w: RUN(w, ckpt=w.heads), "vision_config.hidden_size 32 is not a multiple of num_attention_heads 3"),
    ("image_std 0", lambda w: RUN(w, ckpt=w.std0), "processor_config.json image_processor: image_std must be > 0"),
    ("inf weights", lambda w: RUN(w, ckpt=w.nan), "non-finite weights (NaN or inf) in 1 tensor(s): multi_modal_projector.linear_1.weight"),
    ("index escapes", lambda w: RUN(w, ckpt=w.index), "weight_map: '../outside.safetensors' resolves to"),
    ("EISDIR", lambda w: RUN(w, ckpt=w.config_dir), "config.json: is a directory"),
    ("ELOOP", lambda w: RUN(w, ckpt=w.config_loop), "config.json: too many levels of symbolic links"),
    # data folders
    ("jsonl not UTF-8", lambda w: ["eval", w.ckpt, "--data", w.not_utf8], "samples.jsonl:2: not UTF-8 text (byte b'\\xe9'"),
    ("image ../", lambda w: ["eval", w.ckpt, "--data", w.up], "samples.jsonl:1 image: '../secret.png' resolves to"),
    ("image absolute", lambda w: ["eval", w.ckpt, "--data", w.absolute], "is an absolute path"),
    ("image symlink out", lambda w: ["eval", w.ckpt, "--data", w.symlink], "'images/link.png' resolves to"),
    ("answer type", lambda w: ["eval", w.ckpt, "--data", w.answer_type], "samples.jsonl:1: answer must be a string or null"),
    ("jsonl empty prompt", lambda w: ["eval", w.ckpt, "--data", w.empty_prompt], "samples.jsonl:1: empty prompt"),
    ("data is a file", lambda w: ["eval", w.ckpt, "--data", w.image], "image.png: is a file, not a data folder"),
    ("data image corrupt", lambda w: ["eval", w.ckpt, "--data", w.corrupt], "corrupt/samples.jsonl:1: "),
    # paths: say what is wrong with them, not "not found" or "File exists"
    ("checkpoint symlink loop", lambda w: RUN(w, ckpt=w.loop), "loop: checkpoint directory: a symlink loop"),
    ("checkpoint is a file", lambda w: RUN(w, ckpt=w.image), "image.png: is a file, not a checkpoint directory"),
    ("output under a file", lambda w: ["data", "shapes", "-n", "1", "-o", w.image / "sub"],
     "image.png is a file, not a directory"),
    ("output under a loop", lambda w: ["data", "shapes", "-n", "1", "-o", w.loop / "sub"], "loop is a symlink loop"),
    # reports: never inside the embedded demo model (package data), named or not
    ("report into the demo", lambda w: ["bench", "demo", "--runs", "1", "--json",
                                        Path(__import__("tgedge").demo_checkpoint()) / "train_settings.json"],
     "train_settings.json: it is inside an input of this command"),
    # files swapped for another model's
    ("tokenizer swapped for the guide's", lambda w: RUN(w, "--clip", w.clip, ckpt=w.guide_swapped),
     "guide_swapped/tokenizer.json: the same vocabulary as the text guide's CLIP tokenizer"),
    # serving: every model the entry calls is in the repository before the server starts
    ("serve without a stage", lambda w: ["serve", w.no_stage, "--quiet"],
     "no_stage: model vision missing from the repository"),
    ("serve a FIFO config", lambda w: ["serve", w.fifo_config, "--quiet"],
     "fifo_config/vision/config.pbtxt: is a FIFO (named pipe), not a model configuration"),
    # policies: every limit a number in its figure's range, one that can fail
    *[(f"policy {name}", (lambda name: lambda w: ["validate", w.root, "--data", w.data, "--policy",
                                                  w.policies[name]])(name), fragment) for name, fragment in [
        ("cosine_15", "cosine_15.toml: fp32.vision.min_cosine must be in (0, 1] (got 1.5)"),
        ("cosine_m1", "fp32.vision.min_cosine = -1 can never fail (a cosine is never below -1)"),
        ("top1_0", "fp32.decoder.min_top1 = 0 can never fail (the fraction is never below 0): expected a number in (0, 1]"),
        ("kl_inf", "kl_inf.toml: fp16.decoder.max_kl = inf can never fail: expected a number in [0, ln(vocabulary "
                   "size))"),
        ("bool", "bool.toml: fp16.decoder.max_kl must be a number (got True)"),
        ("negative", "fp16.embed.max_rel must be in [0, 1) (got -0.1)"),
        ("text", "int8.decoder.min_top1 must be a number (got 'high')"),
        ("not_a_section", "not_a_section.toml: fp16.decoder must be a section of limits (got 3)"),
        ("drop_100", "int8.accuracy.max_drop = 100 can never fail (accuracy, in points, drops by at most 100)"),
        ("drop_1000", "int8.accuracy.max_drop = 1000.0 can never fail"),
        # limits a useless runtime passes (probe 3: max_noise_ratio = 1e30 was taken)
        ("noise_1e30", "noise_1e30.toml: fp32.vision.max_noise_ratio = 1e+30 passes an all-zero output (relative L2 1 "
                       "is at most 1e6 noises, the noise being floored at 1e-06): expected a number in [0, 1e6)"),
        ("rel_1", "rel_1.toml: fp16.embed.max_rel = 1 passes an all-zero output (its max_rel figure is 1): expected a "
                  "number in [0, 1)"),
        ("rel_l2_2", "fp16.vision.max_rel_l2 = 2.0 passes an all-zero output"),
        ("abs_1e9", "abs_1e9.toml: fp32.embed.max_abs = 1000000000.0 is beyond fp16's largest number: no difference "
                    "that large is agreement: expected a number in [0, 65504]"),
        ("cosine_0", "cosine_0.toml: int8.fusion.min_cosine = 0 passes an all-zero output (its cosine is 0): expected "
                     "a number in (0, 1]")]],
    # bench
    ("bench beyond context", lambda w: ["bench", w.ckpt, "--image", w.image, "--prompt", "what color?", "--new-tokens",
                                        "100000", "--runs", "1", "--warmup", "0"], "--new-tokens 100000 does not fit"),
    # outputs that are inputs (refused before any work, --force or not)
    ("export over its input", lambda w: ["export", w.ckpt, "-o", w.ckpt, "--force"], "is the input"),
    ("export inside its input", lambda w: ["export", w.ckpt, "-o", w.ckpt / "onnx"], "lies inside the input"),
    ("export over a parent", lambda w: ["export", w.ckpt, "-o", w.root, "--force"], "holds the input"),
    ("quantize over its input", lambda w: ["quantize", w.data, "--precision", "fp16", "-o", w.data], "is the input"),
    ("build over its input", lambda w: ["build", w.data, "-o", w.data], "is the input"),
    ("export over data", lambda w: ["export", w.ckpt, "-o", w.written_data], "holds a tgedge data output, not export"),
    ("train over user files", lambda w: ["train-demo", "-o", w.data], "not empty (images, samples.jsonl) and not a tgedge output"),
    # options named in their refusal (probe 3)
    ("triton tensorrt --max-inflight", lambda w: ["triton", w.root, "-o", w.root / "r", "--backend", "tensorrt",
                                                  "--max-inflight", "8"],
     "--max-inflight 8: with --backend tensorrt an entry instance decodes at most 1 request(s) per step"),
    ("stats --clip missing", lambda w: ["checkpoint", "stats", w.guide_swapped, "--clip", w.root / "nothere"],
     "nothere: not found (expected a transformers CLIPModel directory"),
    ("stats --clip without config", lambda w: ["checkpoint", "stats", w.guide_swapped, "--clip", w.data],
     "data: no config.json (expected a transformers CLIPModel directory"),
    # -o through a link to nothing would create the link's target wherever it points (probe 3: triton -o dang)
    ("-o a dangling link", lambda w: ["data", "shapes", "-n", "2", "-o", w.dangling],
     "dangling: is a symbolic link to "),
    ("-o inside a dangling link", lambda w: ["data", "shapes", "-n", "2", "-o", w.dangling / "sub"],
     "dangling/sub: is inside "),
]


@pytest.fixture(scope="module")
def written(w):
    w.written_data = w.root / "written"
    assert main(["data", "shapes", "-n", "2", "--size", "24", "-o", str(w.written_data)]) == 0
    return w


@pytest.mark.parametrize("argv", [r[1] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2(written, argv, capsys):
    expected = next(r[2] for r in ROWS if r[1] is argv)
    code, _, err = run(capsys, argv(written))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("tgedge: error: ") and expected in lines[0], lines[0]


def test_sixteen_bit_png_answers(w, capsys):
    code, out, err = run(capsys, RUN(w, "--json", image=w.grey16))
    assert code == 0, err


def test_extreme_sampling_answers(w, capsys):
    """Extreme but legal sampling options compute (a temperature of 1e-308 is greedy), no NaN probabilities."""
    code, out, err = run(capsys, RUN(w, "--json", "--temperature", "1e-308", "--top-k", str(10 ** 30), "--top-p", "1e-300"))
    assert code == 0, err
    code, greedy, err = run(capsys, RUN(w, "--json"))
    assert json.loads(out)["tokens"] == json.loads(greedy)["tokens"]


def test_pixel_limit_setting(w, capsys, monkeypatch):
    monkeypatch.setenv("TGEDGE_MAX_IMAGE_PIXELS", "-5")
    code, _, err = run(capsys, RUN(w))
    assert code == 2 and "TGEDGE_MAX_IMAGE_PIXELS='-5': expected a whole number of pixels >= 1" in err
    monkeypatch.setenv("TGEDGE_MAX_IMAGE_PIXELS", "100")
    code, _, err = run(capsys, RUN(w))
    assert code == 2 and "over the limit" in err


def test_argv_bytes_not_utf8_in_a_real_process(w):
    """The console script end to end: argv bytes that are not UTF-8, one line, exit 2."""
    p = subprocess.run([sys.executable, "-m", "tgedge", "run", str(w.ckpt), "--image", str(w.image), "--prompt",
                        b"caf\xe9"], capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert p.returncode == 2 and p.stderr.decode().count("\n") == 1, p.stderr
    assert b"argument --prompt: not valid UTF-8 text" in p.stderr


def test_help_is_exit_0(capsys):
    assert main(["--help"]) == 0 and main(["run", "--help"]) == 0
    assert "Exit codes" in capsys.readouterr().out


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = run(capsys, ["data", "shapes", "-n", "2", "-o", tmp_path / "out"])
    assert code == 2 and err.strip() == f"tgedge: error: {tmp_path / 'out'}: no space left on the device"
    assert list(tmp_path.iterdir()) == []


def test_a_bug_is_a_traceback_and_exit_3(tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr("tgedge.data.shapes.generate", boom)
    code, _, err = run(capsys, ["data", "shapes", "-n", "2", "-o", tmp_path / "out"])
    assert code == 3 and "Traceback" in err and "internal error" in err


def test_interrupt_keeps_the_previous_output_whole(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["data", "shapes", "-n", "3", "--size", "24", "-o", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    from tgedge.data import shapes

    real = shapes.generate

    def interrupted(seed, count, size=112):
        for i, s in enumerate(real(seed + 1, count, size)):
            if i == 2:
                raise KeyboardInterrupt
            yield s

    monkeypatch.setattr(shapes, "generate", interrupted)
    code, _, err = run(capsys, ["data", "shapes", "-n", "3", "--size", "24", "-o", out])
    assert code == 130 and "interrupted" in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- no command deletes or overwrites a file it did not write --------------------------------------------------------
def snapshot(root: Path) -> dict:
    return {p.relative_to(root): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def test_nothing_tgedge_did_not_write_is_ever_deleted(w, tmp_path, capsys, monkeypatch):
    user = tmp_path / "user"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "todo.txt").write_text("mine")
    (user / "photo.png").write_bytes(w.image.read_bytes())
    ckpt = tmp_path / "ckpt"
    shutil.copytree(w.ckpt, ckpt)
    mine = tmp_path / "mine"
    assert main(["data", "shapes", "-n", "2", "--size", "24", "-o", str(mine)]) == 0
    (mine / "added-by-user.txt").write_text("mine too")
    monkeypatch.chdir(user)
    before = snapshot(tmp_path)
    attempts = [
        ["data", "shapes", "-n", "2", "--size", "24", "-o", user],
        ["data", "shapes", "-n", "2", "--size", "24", "-o", "."],
        ["data", "shapes", "-n", "2", "--size", "24", "-o", "..", "--force"],
        ["data", "shapes", "-n", "2", "--size", "24", "-o", user / "photo.png"],
        ["data", "shapes", "-n", "2", "--size", "24", "-o", mine],
        ["data", "shapes", "-n", "2", "--size", "24", "-o", ckpt],
        ["export", ckpt, "-o", ckpt, "--force"],
        ["export", ckpt, "-o", tmp_path, "--force"],
        ["export", ckpt, "-o", user],
        ["quantize", ckpt, "--precision", "fp16", "-o", ckpt],
        ["build", ckpt, "-o", ckpt / "engines"],
        ["train-demo", "-o", user],
        ["train-demo", "-o", ".", "--force"],
    ]
    for argv in attempts:
        code, _, err = run(capsys, argv)
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
    assert snapshot(tmp_path) == before
    assert not (user / MARKER).exists()


def test_output_paths_are_resolved_before_anything_is_created(w, tmp_path, capsys):
    """`-o link/new/..` names what the link points to: refused there, and new/ is not created inside it."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(user)
    before = snapshot(tmp_path)
    code, _, err = run(capsys, ["checkpoint", "random", "--preset", "tg-tiny", "-o", tmp_path / "link" / "clip" / ".."])
    assert code == 2 and "not empty (notes.txt) and not a tgedge output" in err, err
    code, _, err = run(capsys, ["data", "shapes", "-n", "1", "-o", tmp_path / "link" / "sub" / ".."])
    assert code == 2 and "not empty (notes.txt) and not a tgedge output" in err, err
    assert snapshot(tmp_path) == before
    from tgedge.fileio import write_atomic

    write_atomic(tmp_path / "link" / "new" / ".." / "report.json", "{}")
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "report.json"]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "at" / "all")  # -o through it: nothing created there
    for out in (tmp_path / "dangling", tmp_path / "dangling" / "sub"):
        code, _, err = run(capsys, ["data", "shapes", "-n", "1", "-o", out])
        assert code == 2 and "a symbolic link to " in err and not (tmp_path / "nowhere").exists(), err


def test_fake_nvidia_smi_with_odd_numbers(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf 'Odd GPU, 1e999, 550.1, abc\\nOther, -3, , 8.9\\nbroken line\\n\\377\\376\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    code, out, err = run(capsys, ["device", "--json"])
    assert code == 0, err
    gpus = json.loads(out)["gpus"]
    assert [(g["memory_mb"], g["compute_capability"]) for g in gpus] == [(None, None), (None, "8.9")]


@pytest.mark.parametrize("make, expected", [
    (lambda: json.loads("{oops"), "malformed JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    (lambda: __import__("tomllib").loads("a = "), "malformed TOML (Invalid value"),
    (lambda: b"\xff".decode("utf-8"), "not UTF-8 text (byte b'\\xff' at offset 0)"),
    (lambda: open("/nonexistent/x"), "/nonexistent/x: no such file or directory"),
])
def test_boundary_translates_library_errors(make, expected):
    from tgedge.errors import as_user_error

    with pytest.raises(Exception) as info:
        make()
    assert str(as_user_error(info.value)).startswith(expected)
    assert as_user_error(RuntimeError("a bug")) is None


def test_sigterm_leaves_nothing_half_written(tmp_path):
    """A plain `kill` unwinds like Ctrl-C: exit 143, no output and no temporary folder left beside it."""
    import time

    out = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-m", "tgedge", "data", "shapes", "--split", "train", "-n", "100000",
                             "-o", str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".data.tgedge-new-*")) and time.monotonic() < deadline:
        time.sleep(0.05)  # until it is writing
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "tgedge: terminated" in err
    assert list(tmp_path.iterdir()) == []


# -- tampered exports: the demo export copied and edited, one variant per row ----------------------------------------
@pytest.fixture(scope="module")
def x(demo_export, demo_eval, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")

    def variant(name, change):
        d = root / name
        shutil.copytree(demo_export.directory, d)
        change(d)
        return d

    def swap(d, a="embed.onnx", b="fusion.onnx"):
        (d / a).rename(d / "tmp")
        (d / b).rename(d / a)
        (d / "tmp").rename(d / b)

    def swap_rehashed(d):  # vision and fusion swapped, the manifest's checksums rewritten to match: only the
        from tgedge.fileio import sha256_files  # graphs' own inputs/outputs can tell
        from tgedge.runtime.manifest import graph_fingerprint

        swap(d, "vision.onnx", "fusion.onnx")
        m = json.loads((d / "manifest.json").read_text())
        for g in m["graphs"].values():
            g["sha256"], g["fingerprint"] = sha256_files([d / g["file"]]), graph_fingerprint([d / g["file"]])
        (d / "manifest.json").write_text(json.dumps(m))

    def manifest(change):
        def apply(d):
            m = json.loads((d / "manifest.json").read_text())
            change(m)
            (d / "manifest.json").write_text(json.dumps(m))
        return apply

    def edit_preprocess_key(key, value):
        def apply(d):
            pre = json.loads((d / "preprocess.json").read_text())
            pre[key] = value
            (d / "preprocess.json").write_text(json.dumps(pre))
        return apply

    def edit_preprocess(d):
        pre = json.loads((d / "preprocess.json").read_text())
        pre["image"]["mean"] = [0.5, 0.5, 0.5]
        (d / "preprocess.json").write_text(json.dumps(pre))

    def fifo_manifest(d):
        (d / "manifest.json").unlink()
        os.mkfifo(d / "manifest.json")

    os.mkfifo(root / "calibration.json")
    other = root / "other"  # a model of another architecture, as a --reference
    other.mkdir()
    tiny.hf_llava(other)

    def calibration(name, data, method="minmax"):
        graphs = {g: {"CLS": "TensorsData", "calibration_method": "MinMax", "data": data}
                  for g in ("decoder", "fusion", "text_guide", "vision")}
        (root / name).write_text(json.dumps({"method": method, "graphs": graphs}))
        return root / name

    one = {"lowest": {"CLS": "numpy.array", "data": [-1.0], "dtype": "float32"}, "highest": 1.0}
    kl_policy = root / "kl.toml"
    kl_policy.write_text("[fp32.decoder]\nmax_kl = 1e300\n")
    cal = SimpleNamespace(
        foreign=calibration("foreign.json", {"no_such_tensor": one}),
        mixed=calibration("mixed.json", {"no_such_tensor": one}, method="entropy"),
        no_ranges=calibration("no_ranges.json", {}),
        empty=calibration("empty.json", {"x": {**one, "lowest": {**one["lowest"], "data": []}}}),
        nested=calibration("nested.json", {"x": {**one, "lowest": {**one["lowest"], "data": [[-1.0]]}}}))
    return SimpleNamespace(
        root=root, good=Path(demo_export.directory), image=tiny.test_image(root / "image.png"), data=demo_eval,
        swapped=variant("swapped", swap), preprocess=variant("preprocess", edit_preprocess),
        rehashed=variant("rehashed", swap_rehashed),
        no_file_sha=variant("no_file_sha", manifest(lambda m: m.pop("file_sha256"))),
        long_context=variant("long_context", manifest(lambda m: m.update(max_context=300))),
        eos=variant("eos", manifest(lambda m: m["model"].update(eos_token_id=[999]))),
        vocab=variant("vocab", manifest(lambda m: m["model"]["decoder"].update(vocab_size=600))),
        fifo_preprocess=variant("fifo_preprocess", lambda d: ((d / "preprocess.json").unlink(),
                                                             os.mkfifo(d / "preprocess.json"))),
        fifo_manifest=variant("fifo_manifest", fifo_manifest), cal=cal,
        image_tokens=variant("image_tokens", edit_preprocess_key("num_image_tokens", 81)), other=other,
        kl_policy=kl_policy)


def XRUN(x, export, *extra):
    return ["run", export, "--image", x.image, "--prompt", "what color?", "--max-new-tokens", "2", *extra]


EXPORT_ROWS = [
    ("vocab_size edited", lambda x: XRUN(x, x.vocab), "model.decoder.vocab_size 600 is not the decoder's logits width"),
    ("triton swapped graphs, checksums rewritten", lambda x: ["triton", x.rehashed, "-o", x.root / "repo"],
     "rehashed/vision.onnx: graph inputs do not match manifest.json"),
    ("triton swapped graphs", lambda x: ["triton", x.swapped, "-o", x.root / "repo"],
     "graph 'fusion' (fusion.onnx) is not the one manifest.json describes (sha256 differs)"),
    ("run edited preprocess.json", lambda x: XRUN(x, x.preprocess),
     "preprocess: preprocess.json is not the one manifest.json describes (sha256 differs): it changed after export"),
    ("triton edited preprocess.json", lambda x: ["triton", x.preprocess, "-o", x.root / "repo"],
     "preprocess.json is not the one manifest.json describes (sha256 differs)"),
    ("validate edited preprocess.json", lambda x: ["validate", x.preprocess, "--data", x.data],
     "preprocess.json is not the one manifest.json describes (sha256 differs)"),
    ("max_context above the positions", lambda x: XRUN(x, x.long_context),
     "manifest.json: max_context 300 is above the model's positions (model.decoder.max_position_embeddings 256)"),
    ("manifest.json is a FIFO", lambda x: XRUN(x, x.fifo_manifest),
     "manifest.json: is a FIFO (named pipe), not a JSON file"),
    ("calibration.json is a FIFO", lambda x: ["quantize", x.good, "--precision", "int8", "--calibration",
                                              x.root / "calibration.json", "-o", x.root / "repo"],
     "calibration.json: is a FIFO (named pipe), not a calibration file"),
    *[(f"calibration {name}", (lambda name, extra: lambda x: [
        "quantize", x.good, "--precision", "int8", "--calibration", getattr(x.cal, name), "-o", x.root / "repo",
        *extra])(name, extra), fragment) for name, extra, fragment in [
        ("foreign", ["--method", "entropy"], "foreign.json was measured with method minmax: leave --method out"),
        ("foreign", [], "graphs.text_guide.data names 1 tensor(s) the text_guide graph lacks (no_such_tensor)"),
        ("no_ranges", [], "no_ranges.json: graphs.text_guide.data has no range for "),
        ("mixed", [], "mixed.json: graphs.decoder.calibration_method MinMax is not the file's method entropy"),
        ("empty", [], 'empty.json: graphs.decoder.data["x"].lowest must be a number or a numpy.array object whose '
                      "data is a non-empty flat list of numbers"),
        ("nested", [], 'graphs.decoder.data["x"].lowest must be a number or a numpy.array object whose data is a '
                       "non-empty flat list")]],
    ("smooth search with fp16", lambda x: ["quantize", x.good, "--precision", "fp16", "--smooth", "search", "-o",
                                           x.root / "repo"],
     "--smooth applies SmoothQuant to int8 graphs; --precision fp16 quantises none to int8: leave it out"),
    ("smooth word", lambda x: ["quantize", x.good, "--precision", "int8", "--smooth", "serch", "-o", x.root / "repo"],
     "argument --smooth: expected a number in [0.0, 1.0], got 'serch' (SmoothQuant's alpha), or auto, search or none"),
    ("smooth with fp16", lambda x: ["quantize", x.good, "--precision", "fp16", "--smooth", "0.5", "-o",
                                    x.root / "repo"],
     "--smooth applies SmoothQuant to int8 graphs; --precision fp16 quantises none to int8: leave it out"),
    ("outlier channels with fp16", lambda x: ["quantize", x.good, "--precision", "fp16", "--outlier-channels",
                                              "fp32", "-o", x.root / "repo"],
     "--outlier-channels fp32 splits int8 and weight-only graphs' MatMuls; --precision fp16 has none: leave it out"),
    ("outlier channels word", lambda x: ["quantize", x.good, "--precision", "int8", "--outlier-channels", "fp16",
                                         "-o", x.root / "repo"],
     "argument --outlier-channels: invalid choice: 'fp16' (choose from "),
    ("calib-limit with calibration", lambda x: ["quantize", x.good, "--precision", "int8", "--calibration",
                                                x.cal.foreign, "--calib-limit", "2", "-o", x.root / "repo"],
     "--calib-limit N takes the first N samples of --calib DIR: --calibration reuses saved ranges, leave it out"),
    ("block-size with fp16", lambda x: ["quantize", x.good, "--precision", "fp16", "--block-size", "32", "-o",
                                        x.root / "repo"],
     "--block-size sets int4w/int8w graphs' MatMulNBits blocks; --precision fp16 has none"),
    ("export an export", lambda x: ["export", x.good, "-o", x.root / "repo"],
     "is an export directory (manifest.json), not a checkpoint: run it with tgedge run"),
    ("image tokens in preprocess.json", lambda x: XRUN(x, x.image_tokens, "--no-verify"),
     "image_tokens/preprocess.json: num_image_tokens 81, the model's is 80 (manifest.json model)"),
    ("validate reference another model", lambda x: ["validate", x.good, "--data", x.data, "--reference", x.other],
     "another model than the export's ("),
    ("run without file checksums", lambda x: XRUN(x, x.no_file_sha),
     "preprocess.json has no sha256 in manifest.json (file_sha256.preprocess), so it cannot be checked"),
    # quantize checks its input as triton does: a swapped graph would be quantised and given a new checksum (probe 3)
    ("quantize swapped graphs", lambda x: ["quantize", x.swapped, "--precision", "fp16", "-o", x.root / "q"],
     "graph 'fusion' (fusion.onnx) is not the one manifest.json describes (sha256 differs)"),
    ("quantize edited preprocess.json", lambda x: ["quantize", x.preprocess, "--precision", "fp16", "-o", x.root / "q"],
     "preprocess.json is not the one manifest.json describes (sha256 differs)"),
    ("quantize fp16 --method", lambda x: ["quantize", x.good, "--precision", "fp16", "--method", "entropy", "-o",
                                          x.root / "q"], "--method is for int8 graphs"),
    ("quantize fp16 --int8-attention", lambda x: ["quantize", x.good, "--precision", "fp16", "--int8-attention", "-o",
                                                  x.root / "q"], "--int8-attention is for int8 graphs"),
    ("run export --clip", lambda x: XRUN(x, x.good, "--clip", x.root), "--clip is for original-layout checkpoints"),
    # max_kl's ceiling is the export's ln(vocab_size): a uniform guess scores at most that (probe 3: 1e300 was taken)
    ("policy max_kl above ln(vocab)", lambda x: ["validate", x.good, "--data", x.data, "--policy", x.kl_policy],
     "kl.toml: fp32.decoder.max_kl = 1e+300 passes a runtime that knows nothing (uniform over the export's 49 tokens "
     "it is at most ln(49) = 3.892 nats from the reference): expected a number in [0, 3.892)"),
    ("manifest eos beyond the vocabulary", lambda x: XRUN(x, x.eos),
     "model.eos_token_id must be token ids in [0, 48] (model.decoder.vocab_size 49; got [999])"),
    ("triton preprocess.json a FIFO", lambda x: ["triton", x.fifo_preprocess, "-o", x.root / "repo"],
     "preprocess.json: is a FIFO (named pipe), not a preprocessing file"),
    # build: the input and its options are judged before the TensorRT module is looked for (probe 3: every one of these
    # said "the tensorrt backend needs the tensorrt Python module" here, and a timing cache inside the export was
    # going to be read as a cache and replaced)
    ("build timing cache inside the export", lambda x: ["build", x.good, "-o", x.root / "repo", "--timing-cache",
                                                        x.good / "manifest.json"],
     "manifest.json: it is inside an input of this command"),
    ("build graph bogus", lambda x: ["build", x.good, "-o", x.root / "repo", "--graph", "bogus"],
     "--graph: unknown graph(s) bogus (this export has text_guide, vision, fusion, embed, decoder)"),
    ("build a data folder", lambda x: ["build", x.data, "-o", x.root / "repo"], "no manifest.json"),
    ("quantize precision empty", lambda x: ["quantize", x.good, "--precision", "", "-o", x.root / "q"],
     "--precision: unknown precision '' (choose from fp32, fp16, int8w, int8, int4w, or GRAPH=PRECISION,...)"),
    ("run export --backend torch", lambda x: XRUN(x, x.good, "--backend", "torch"),
     "--backend torch runs checkpoints; "),
    ("quantize exclude matches nothing", lambda x: ["quantize", x.good, "--precision", "fp16", "--exclude", "/no/*",
                                                    "-o", x.root / "q"],
     "--exclude '/no/*' matches no node that --precision fp16 quantises"),
]


@pytest.mark.parametrize("argv", [r[1] for r in EXPORT_ROWS], ids=[r[0] for r in EXPORT_ROWS])
def test_bad_export_is_one_line_exit_2(x, argv, capsys):
    expected = next(r[2] for r in EXPORT_ROWS if r[1] is argv)
    code, _, err = run(capsys, argv(x))
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("  ")]  # quantize's steps
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("tgedge: error: ") and expected in lines[0], lines[0]
    assert not (x.root / "repo").exists() and not list(x.root.glob(".repo.*")) and not (x.root / "q").exists()


def test_no_verify_takes_the_files_as_they_are(x, tmp_path, capsys):
    code, _, err = run(capsys, ["triton", x.swapped, "-o", tmp_path / "repo", "--no-verify"])
    assert code == 0, err
    code, _, err = run(capsys, ["quantize", x.swapped, "--precision", "fp16", "-o", tmp_path / "q", "--no-verify"])
    assert code == 0 and (tmp_path / "q" / "manifest.json").exists(), err
    code, _, err = run(capsys, XRUN(x, x.preprocess, "--no-verify"))
    assert code == 0, err
    code, out, _ = run(capsys, ["inspect", x.preprocess])
    assert code == 1 and "preprocess.json is not the one manifest.json describes" in " ".join(out.split())


def test_in_memory_image_errors_name_no_object():
    """A served request's image is bytes, not a file: PIL's message must not show the object's repr."""
    import io

    from tgedge.errors import TgedgeError
    from tgedge.preprocess import load_image

    class Bytes(io.BytesIO):
        def __str__(self):
            return "request image"

    with pytest.raises(TgedgeError) as info:
        load_image(Bytes(b""))
    assert str(info.value) == "request image: unreadable image (cannot identify image file)"
