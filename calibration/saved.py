"""`calibration.json`, as `tgedge quantize` saves it and `--calibration` reads it back: checked when read, before any
onnxruntime work, every problem named by its key.

The file: `method`, `data` (where the ranges were measured), `graphs` (graph -> onnxruntime's `TensorsData` as
`save_tensors_data` writes it: `calibration_method` and `data`, tensor -> `TensorData` with `lowest` / `highest` and,
for entropy and percentile, a histogram), and for SmoothQuant / AWQ-style `smooth`, `channels`, `mean_sq`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tgedge.config import bad_numbers
from tgedge.errors import TgedgeError
from tgedge.fileio import regular_file

METHODS = ("minmax", "entropy", "percentile")
CALIBRATION = "calibration.json"
TOP_KEYS = ("method", "data", "graphs", "smooth", "channels", "mean_sq")
DATA_KEYS = {"path": str, "samples": int, "sha256": str}
GRAPH_KEYS = ("CLS", "calibration_method", "data", "smooth_quant")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")  # onnxruntime's CalibrationMethod
METHOD_NAMES = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}  # tgedge's -> onnxruntime's
# onnxruntime's TensorData fields; the float ones must be float32 / float16 arrays (TensorData refuses others)
TENSOR_FLOATS = ("avg", "std", "lowest", "highest", "hist_edges")
TENSOR_KEYS = ("CLS", *TENSOR_FLOATS, "hist", "bins")
FLOAT_DTYPES = ("float32", "float16")
NUMBER_DTYPES = (*FLOAT_DTYPES, "float64", "int64", "int32", "uint64", "uint32")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _numbers(v) -> bool:
    """A number, or a non-empty flat list of numbers: what TensorData's arrays hold (an empty range fails deep in
    onnxruntime with an AssertionError; a nested one is not a range)."""
    return _number(v) or (isinstance(v, list) and len(v) > 0 and all(_number(x) for x in v))


def _array(value, key: str, dtypes: tuple[str, ...], out: list[str]):
    """The values of a number or of `{"CLS": "numpy.array", "data": [...], "dtype": ...}` (None if malformed)."""
    if _number(value):
        return [value]
    if not isinstance(value, dict) or set(value) - {"CLS", "data", "dtype"} or value.get("CLS", "numpy.array") != \
            "numpy.array" or not _numbers(value.get("data")):
        out.append(f"{key} must be a number or a numpy.array object whose data is a non-empty flat list of numbers "
                   f"(got {json.dumps(value)[:60]})")
        return None
    if value.get("dtype") not in dtypes:
        out.append(f"{key} dtype {value.get('dtype')!r} is not one of {', '.join(dtypes)}")
        return None
    data = value["data"]
    return data if isinstance(data, list) else [data]


def _object_problems(value: dict, key: str, known: tuple, cls: str) -> list[str]:
    """An onnxruntime-serialised object's keys and CLS (absent: taken as `cls`); `value` is a dict."""
    unknown = sorted(set(value) - set(known))
    out = [f"{key}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})"] if unknown else []
    if value.get("CLS", cls) != cls:
        out.append(f"{key}.CLS must be {cls} (got {value['CLS']!r})")
    return out


def _tensor_problems(t, key: str) -> list[str]:
    if not isinstance(t, dict):
        return [f"{key} must be an object (got {json.dumps(t)[:40]})"]
    out = _object_problems(t, key, TENSOR_KEYS, "TensorData")
    out += [f"{key}.{k} missing" for k in ("lowest", "highest") if k not in t]
    values = {k: _array(t[k], f"{key}.{k}", FLOAT_DTYPES, out) for k in TENSOR_FLOATS if k in t}
    for k in ("hist", "bins"):
        if k in t:
            _array(t[k], f"{key}.{k}", NUMBER_DTYPES, out)
    low, high = values.get("lowest"), values.get("highest")
    if low and high and (len(low) != len(high) or any(a > b for a, b in zip(low, high))):
        out.append(f"{key}: lowest {low if len(low) > 1 else low[0]} is above highest "
                   f"{high if len(high) > 1 else high[0]}" if len(low) == len(high) else
                   f"{key}: lowest and highest differ in length ({len(low)}, {len(high)})")
    return out


def graph_method(g: dict) -> str | None:
    """A graph's onnxruntime CalibrationMethod name ("MinMax"), as an object or a string; None if it names none."""
    method = g.get("calibration_method")
    name = method.get("value") if isinstance(method, dict) and method.get("CLS") == "CalibrationMethod" else method
    return name.split(".")[-1] if isinstance(name, str) and name.split(".")[-1] in CALIBRATION_METHODS else None


def _graph_problems(g, key: str, method: str | None) -> list[str]:
    if not isinstance(g, dict):
        return [f"{key} must be an object (got {json.dumps(g)[:40]})"]
    out = _object_problems(g, key, GRAPH_KEYS, "TensorsData")
    name = graph_method(g)
    if name is None:
        out.append(f"{key}.calibration_method must name one of {', '.join(CALIBRATION_METHODS)} "
                   f"(got {json.dumps(g.get('calibration_method'))[:60]})")
    elif method in METHOD_NAMES and name != METHOD_NAMES[method]:  # onnxruntime refuses the pair, with a traceback
        out.append(f"{key}.calibration_method {name} is not the file's method {method} ({METHOD_NAMES[method]})")
    if "smooth_quant" in g and not isinstance(g["smooth_quant"], bool):
        out.append(f"{key}.smooth_quant must be true or false (got {json.dumps(g['smooth_quant'])})")
    if not isinstance(g.get("data"), dict):
        return out + [f"{key}.data must be an object of tensors (got {json.dumps(g.get('data'))[:40]})"]
    for tensor, t in g["data"].items():
        out += _tensor_problems(t, f"{key}.data[{json.dumps(tensor)}]")
    return out


def _statistics_problems(stats, key: str) -> list[str]:
    """channels / mean_sq: graph -> input tensor -> one finite number per channel."""
    if not isinstance(stats, dict) or not all(isinstance(c, dict) for c in stats.values()):
        return [f"{key} must be an object of graphs, each an object of tensors"]
    return [f"{key}.{g}[{json.dumps(t)}] must be a list of finite numbers" for g, c in stats.items()
            for t, v in c.items() if not (isinstance(v, list) and all(_number(x) for x in v))]


def calibration_problems(saved: dict) -> list[str]:
    """What is wrong with a calibration file's keys, types and ranges, every problem; empty when none."""
    out = [f"unknown key(s) {', '.join(sorted(set(saved) - set(TOP_KEYS)))} (known: {', '.join(TOP_KEYS)})"] \
        if set(saved) - set(TOP_KEYS) else []
    if saved.get("method") not in METHODS:
        out.append(f"method must be one of {', '.join(METHODS)} (got {json.dumps(saved.get('method'))})")
    data = saved.get("data")
    if data is not None and (not isinstance(data, dict) or set(data) - set(DATA_KEYS) or any(
            not isinstance(data[k], kind) or isinstance(data[k], bool) for k, kind in DATA_KEYS.items() if k in data)):
        out.append(f"data must be an object with path (string), samples (integer), sha256 (string) "
                   f"(got {json.dumps(data)[:60]})")
    if "smooth" in saved and saved["smooth"] != "search" and not (_number(saved["smooth"]) and 0 <= saved["smooth"]
                                                                    <= 1):
        out.append(f"smooth must be a number in [0, 1] (SmoothQuant's alpha) or \"search\" (got "
                   f"{json.dumps(saved['smooth'])})")
    for key in ("channels", "mean_sq"):
        if key in saved:
            out += _statistics_problems(saved[key], key)
    for graph, g in saved["graphs"].items():
        out += _graph_problems(g, f"graphs.{graph}", saved.get("method"))
    return out


def read_calibration(path: str | Path, graphs: list[str]) -> dict:
    """A saved calibration.json, checked: ranges finite and within 1e6, every key known and typed, lowest <= highest,
    a calibration for each of `graphs`."""
    regular_file(path, "calibration file")  # a FIFO would block the read below
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TgedgeError(f"{path}: cannot read calibration ({e})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("graphs"), dict):
        raise TgedgeError(f"{path}: not a tgedge calibration file (no 'graphs' object)")
    bad = bad_numbers(saved["graphs"], f"{path} graphs", max_abs=1e6)
    if bad:
        raise TgedgeError(f"{path}: calibration ranges that are not finite or beyond 1e6: {', '.join(bad[:5])}"
                          + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
    problems = calibration_problems(saved)
    if problems:
        raise TgedgeError(f"{path}: {'; '.join(problems[:8])}" + (f" (+{len(problems) - 8} more)"
                                                                  if len(problems) > 8 else ""))
    missing = [g for g in graphs if g not in saved.get("graphs", {})]
    if missing:
        raise TgedgeError(f"{path}: no calibration for {', '.join(missing)}")
    return saved
