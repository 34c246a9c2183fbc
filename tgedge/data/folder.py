"""Data folders: `images/*.png` + `samples.jsonl` rows `{"image", "prompt", "answer", "type"}` (docs/DATA.md).

The format `tgedge eval`, `tgedge validate` and calibration read. Writing goes to a temporary folder that
is renamed at the end, so an interrupted write leaves nothing half-written. Image names must stay inside the
folder (no absolute or `../` paths, symlinks included).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tgedge.errors import TgedgeError, absent, os_error
from tgedge.fileio import atomic_dir, inside, read_input, special_file

REQUIRED = ("image", "prompt")
OPTIONAL = ("answer", "type")  # strings or null


@dataclass(frozen=True)
class Record:
    image: Path  # absolute
    prompt: str
    answer: str | None
    type: str | None
    line: int
    source: Path | None = None  # the samples.jsonl it came from

    @property
    def where(self) -> str:
        return f"{self.source or 'samples.jsonl'}:{self.line}"

    @contextlib.contextmanager
    def errors(self):
        """An error while this row's image or prompt is used names the row: `data/samples.jsonl:7: ...`."""
        try:
            yield
        except TgedgeError as e:
            raise TgedgeError(f"{self.where}: {e}") from None
        except OSError as e:
            raise TgedgeError(f"{self.where}: {os_error(e)}") from None


def read_folder(directory: str | Path) -> list[Record]:
    directory = Path(directory)
    if not directory.is_dir():
        raise TgedgeError(f"{directory}: {absent(directory, 'data folder')}")
    path = directory / "samples.jsonl"
    if not path.exists():
        raise TgedgeError(f"{directory}: no samples.jsonl")
    data = read_input(path, "data file")
    records = []
    for n, raw in enumerate(data.splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TgedgeError(f"{path}:{n}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                              f"{e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TgedgeError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or any(not isinstance(row.get(k), str) for k in REQUIRED):
            raise TgedgeError(f"{path}:{n}: a row needs string fields {', '.join(REQUIRED)}")
        wrong = [k for k in OPTIONAL if row.get(k) is not None and not isinstance(row[k], str)]
        if wrong:
            raise TgedgeError(f"{path}:{n}: {', '.join(wrong)} must be a string or null")
        if not row["prompt"].strip():
            raise TgedgeError(f"{path}:{n}: empty prompt")
        image = inside(directory, row["image"], f"{path}:{n} image")
        if (kind := special_file(image)) is not None:  # refused before anything opens it: a FIFO would block
            raise TgedgeError(f"{path}:{n}: image {row['image']} is {kind}, not an image")
        if not image.is_file():
            raise TgedgeError(f"{path}:{n}: {row['image']}: {absent(image, 'image')}")
        records.append(Record(image, row["prompt"], row.get("answer"), row.get("type"), n, path))
    if not records:
        raise TgedgeError(f"{path}: no samples")
    return records


def write_folder(samples: Iterable, out: str | Path, progress=None, force: bool = False) -> Path:
    """Write samples (objects with image, prompt, answer, type and optional labels()) as a data folder.

    `out` follows tgedge's output rule (tgedge.fileio): new, empty, or an earlier data folder, unless `force`."""
    out = Path(out)
    with atomic_dir(out, kind="data", force=force) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "samples.jsonl", "w", encoding="utf-8") as f:
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
