"""Decoder variants of an existing export for benchmarks (docs/BENCHMARKS.md): each OUT_ROOT/NAME is the source
export with its decoder written again by export/decoder_graph.py from the checkpoint (streamed weights), in a cache
mode and weight format; the embed graph is copied (the decoder's checker reads its shared table) and the other
graphs symbolic-linked (replace them by hard links before `tgedge bench`: the manifest refuses names that resolve
outside the directory). Not checked against torch: `tgedge export` does that.

    python scripts/decoder_variants.py SRC_EXPORT CHECKPOINT CLIP OUT_ROOT NAME:MODE:WEIGHTS:BLOCK:LEVEL[:h] ...

MODE growing|static|static-onnx, WEIGHTS fp32|int4w|int8w, BLOCK and LEVEL the MatMulNBits block size and accuracy level, `h`:
the LM head quantised too. e.g. int4-s-b32-a4-h:static:int4w:32:4:h
"""
import os
import shutil
import sys
import time
from pathlib import Path

import onnx

from tgedge.calibration.weight_only import WeightOnly
from tgedge.precision import PRECISIONS, REFERENCE
from tgedge.checkpoint import load_model
from tgedge.contract import StageContract
from tgedge.export.onnx_export import write_graph
from tgedge.export.specs import graph_specs
from tgedge.runtime.manifest import Manifest

src, ckpt_dir, clip, root = Manifest.load(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
model, ckpt = load_model(ckpt_dir, clip, device="meta")
for spec_text in sys.argv[5:]:
    name, mode, weights, block, level, *head = spec_text.split(":")
    out = root / name
    if (out / "manifest.json").exists():
        print("exists", out)
        continue
    out.mkdir(parents=True, exist_ok=True)
    t = time.time()
    contract = StageContract.from_config(src.model, src.max_context, cache_mode=mode, dims=src.dims)
    for f in src.directory.iterdir():
        if not f.name.startswith(("decoder.onnx", "manifest.json", ".tgedge")) and not (out / f.name).exists():
            if f.name.startswith("embed.onnx"):  # the decoder's checker reads the shared table: a real file
                shutil.copyfile(f, out / f.name)
            else:
                (out / f.name).symlink_to(f)
    table = onnx.load(str(src.graph_path("embed")), load_external_data=False).graph.initializer[0]
    spec = {s.name: s for s in graph_specs(model, contract)}["decoder"]
    wo = None if weights == REFERENCE.name else WeightOnly.of(PRECISIONS[weights], int(block), int(level), bool(head))
    entry, _ = write_graph(spec, model, contract, ckpt.weights, out / "decoder.onnx", REFERENCE, None, table, wo)
    m = Manifest(graphs={**src.graphs, "decoder": entry}, dims=src.dims, max_context=src.max_context, opset=src.opset,
                 model=src.model, files=src.files, reference=src.reference, source=src.source, contract=contract)
    m.save(out)
    print(f"wrote {out} in {time.time() - t:.1f} s", flush=True)
