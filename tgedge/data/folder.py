"""Data folders: `images/*.png` + `samples.jsonl` rows `{"image", "prompt", "answer", "type"}` (docs/DATA.md).

The format `tgedge eval`, `tgedge validate` and calibration read. Writing goes to a temporary folder that
is renamed at the end, so an interrupted write leaves nothing half-written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tgedge.errors import TgedgeError
from tgedge.fileio import atomic_dir

REQUIRED = ("image", "prompt")


@dataclass(frozen=True)
class Record:
    image: Path  # absolute
    prompt: str
    answer: str | None
    type: str | None
    line: int


def read_folder(directory: str | Path) -> list[Record]:
    directory = Path(directory)
    if not directory.is_dir():
        raise TgedgeError(f"{directory}: data folder not found")
    path = directory / "samples.jsonl"
    if not path.exists():
        raise TgedgeError(f"{directory}: no samples.jsonl")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TgedgeError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in REQUIRED):
            raise TgedgeError(f"{path}:{n}: a row needs string fields {', '.join(REQUIRED)}")
        image = directory / row["image"]
        if not image.is_file():
            raise TgedgeError(f"{path}:{n}: image {row['image']} not found")
        records.append(Record(image, row["prompt"], row.get("answer"), row.get("type"), n))
    if not records:
        raise TgedgeError(f"{path}: no samples")
    return records


def write_folder(samples: Iterable, out: str | Path, progress=None) -> Path:
    """Write samples (objects with image, prompt, answer, type and optional labels()) as a data folder."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "samples.jsonl", "w") as f:
            for i, s in enumerate(samples):
                name = f"images/{i:06d}.png"
                s.image.save(tmp / name, format="PNG")
                row = {"image": name, "prompt": s.prompt, "answer": s.answer, "type": s.type}
                if hasattr(s, "labels"):
                    row["shapes"] = s.labels()
                f.write(json.dumps(row) + "\n")
                if progress is not None:
                    progress()
    return out
