"""The demo task: pictures of 1-5 coloured shapes on a 3x3 grid with short-answer questions.

Deterministic from a seed (numpy + pillow). Some shapes are small enough that only TG-DP's x2 crops
show them clearly; the `small_color` questions ask about those. Every shape carries its dense labels
(grid cell, shape, colour, size) so that a vision tower can be pre-trained on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30),
          "purple": (150, 60, 190)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
QUESTION_TYPES = ("color", "shape_at", "count", "presence", "small_color")
SPLIT_SEEDS = {"train": 0, "calibration": 1, "eval": 2}
SPLIT_SIZES = {"train": 10000, "calibration": 256, "eval": 1000}


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cell: int  # 0..8, row-major over the 3x3 grid
    small: bool


@dataclass(frozen=True)
class Placed:
    """A shape where it was drawn: centre and radius in pixels."""
    shape: Shape
    cx: float
    cy: float
    r: float


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    placed: tuple[Placed, ...]
    prompt: str
    answer: str
    type: str

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return tuple(p.shape for p in self.placed)

    def labels(self) -> list[dict]:
        return [asdict(s) for s in self.shapes]


def place(shapes: tuple[Shape, ...], size: int, rng: np.random.Generator) -> tuple[Placed, ...]:
    """Each shape centred in its cell with a little jitter; small ones at about 3% of the image."""
    cell = size / 3
    out = []
    for s in shapes:
        r = cell * (rng.uniform(0.08, 0.11) if s.small else rng.uniform(0.28, 0.4))
        cx = (s.cell % 3 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        cy = (s.cell // 3 + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
        out.append(Placed(s, cx, cy, r))
    return tuple(out)


def paint(image: Image.Image, placed: tuple[Placed, ...], fill_of) -> Image.Image:
    pen = ImageDraw.Draw(image)
    for p in placed:
        cx, cy, r, fill = p.cx, p.cy, p.r, fill_of(p.shape)
        if p.shape.kind == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif p.shape.kind == "square":
            pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif p.shape.kind == "triangle":
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            pen.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    return image


def draw(placed: tuple[Placed, ...], size: int, rng: np.random.Generator) -> Image.Image:
    """Noisy light background, then the shapes."""
    base = rng.integers(150, 215)
    noise = rng.normal(0, 12, (size, size, 3))
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    return paint(image, placed, lambda s: COLORS[s.color])


def class_id(s: Shape) -> int:
    """Dense label of a shape: 1 + (kind, colour, small) packed; 0 is background."""
    return 1 + (SHAPES.index(s.kind) * len(COLORS) + list(COLORS).index(s.color)) * 2 + int(s.small)


NUM_CLASSES = 1 + len(SHAPES) * len(COLORS) * 2


def label_map(placed: tuple[Placed, ...], size: int) -> np.ndarray:
    """(size, size) uint8 map of class ids, drawn with the same geometry as the picture."""
    return np.asarray(paint(Image.new("L", (size, size), 0), placed, class_id))


def _layout(rng: np.random.Generator, want_small: bool) -> tuple[Shape, ...]:
    n = int(rng.integers(1, 6))
    cells = rng.choice(9, size=n, replace=False)
    small_at = int(rng.integers(n)) if want_small else -1
    return tuple(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), int(c), i == small_at)
                 for i, c in enumerate(cells))


def _question(kind: str, shapes: tuple[Shape, ...], rng: np.random.Generator) -> tuple[str, str] | None:
    """(prompt, answer) for this question type, or None when the picture cannot support it."""
    kinds = [s.kind for s in shapes]
    if kind == "color":
        unique = [s for s in shapes if kinds.count(s.kind) == 1 and not s.small]
        if not unique:
            return None
        s = unique[int(rng.integers(len(unique)))]
        return f"what color is the {s.kind}?", s.color
    if kind == "shape_at":
        big = [s for s in shapes if not s.small]
        if not big:
            return None
        s = big[int(rng.integers(len(big)))]
        return f"what shape is at the {POSITIONS[s.cell]}?", s.kind
    if kind == "count":
        k = str(rng.choice(SHAPES))
        return f"how many {k}s are there?", NUMBERS[kinds.count(k)]
    if kind == "presence":
        if rng.random() < 0.5:  # half yes, half no
            s = shapes[int(rng.integers(len(shapes)))]
            return f"is there a {s.color} {s.kind}?", "yes"
        present = {(s.color, s.kind) for s in shapes}
        absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
        c, k = absent[int(rng.integers(len(absent)))]
        return f"is there a {c} {k}?", "no"
    small = [s for s in shapes if s.small]
    if not small:
        return None
    return f"what color is the small {small[0].kind}?", small[0].color


def sample(rng: np.random.Generator, size: int = 112, kind: str | None = None) -> Sample:
    """One picture and one question (of `kind`, or a type drawn uniformly)."""
    kind = kind or str(rng.choice(QUESTION_TYPES))
    while True:
        shapes = _layout(rng, want_small=kind == "small_color" or rng.random() < 0.3)
        qa = _question(kind, shapes, rng)
        if qa is not None:
            placed = place(shapes, size, rng)
            return Sample(draw(placed, size, rng), placed, qa[0], qa[1], kind)


def generate(seed: int, count: int, size: int = 112):
    """`count` samples from one seeded stream, question types in turn so that each split is balanced."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        yield sample(rng, size, QUESTION_TYPES[i % len(QUESTION_TYPES)])


def vocabulary() -> list[str]:
    """Every word a prompt or answer of this task can contain."""
    words = {"what", "color", "is", "the", "shape", "at", "how", "many", "are", "there", "a", "small", "yes", "no"}
    words |= set(SHAPES) | {k + "s" for k in SHAPES} | set(COLORS) | set(NUMBERS)
    words |= {w for p in POSITIONS for w in p.split()}
    return sorted(words)


def patch_labels(labels: np.ndarray, placed: tuple[Placed, ...], box: tuple[int, int, int, int],
                 grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch of a view covering `box` (x0, y0, x1, y1) of the picture, split `grid` x `grid`:
    the class covering most of it (background only when nothing is there) and whether a shape's
    centre falls in it. -> (grid*grid,) int64 each, row-major."""
    x0, y0, x1, y1 = box
    xs = np.linspace(x0, x1, grid + 1).round().astype(int)
    ys = np.linspace(y0, y1, grid + 1).round().astype(int)
    cls = np.zeros((grid, grid), np.int64)
    centre = np.zeros((grid, grid), np.int64)
    for i in range(grid):
        for j in range(grid):
            counts = np.bincount(labels[ys[i]:ys[i + 1], xs[j]:xs[j + 1]].ravel(), minlength=NUM_CLASSES)
            counts[0] = 0
            cls[i, j] = counts.argmax() if counts.any() else 0
    for p in placed:
        if x0 <= p.cx < x1 and y0 <= p.cy < y1:
            j = min(int((p.cx - x0) / (x1 - x0) * grid), grid - 1)
            i = min(int((p.cy - y0) / (y1 - y0) * grid), grid - 1)
            centre[i, j] = 1
    return cls.ravel(), centre.ravel()
