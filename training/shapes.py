"""A deterministic generator of coloured-shape pictures with correct and wrong descriptions.

It feeds the demo reward model (``examples/make_demo_model.py``): a picture holds 1-3 filled shapes (circle, square,
triangle in red, green, blue or yellow) on white, each in its own cell of a grid so shapes never overlap. All
shapes have the same size, so a colour's area says something about the count and the kind.

The correct description lists every (colour, kind) group with its count ("A red circle and two blue squares.");
a wrong one changes exactly one attribute of one group: its colour, its kind or its count. Because that moves the
group's count from one (colour, kind) key to another, the wrong description never equals the truth.

Everything is a pure function of the seed (``random.Random(seed)``), so data sets are reproducible.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 195, 20),
}
KINDS = ("circle", "square", "triangle")
CORRUPTIONS = ("colour", "kind", "count")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
PROMPTS = (
    "Describe the image.",
    "What is in this picture?",
    "Which shapes do you see?",
    "Describe the shapes in the image briefly.",
)
MAX_COUNT = 3


@dataclass(slots=True)
class Shape:
    kind: str
    colour: str
    cx: float  # centre, pixels
    cy: float
    size: float  # side of the bounding square, pixels


@dataclass(slots=True)
class Scene:
    width: int
    height: int
    shapes: list[Shape] = field(default_factory=list)

    def groups(self) -> Counter:
        """(colour, kind) -> count."""
        return Counter((s.colour, s.kind) for s in self.shapes)


def random_scene(rng: random.Random, width: int = 112, height: int = 112, max_shapes: int = 3) -> Scene:
    """1..max_shapes shapes, each in its own cell of the smallest grid with max_shapes cells (1x1, 2x1 or 2x2), all
    of one size (75% of a cell's short side, so a colour's area tells count and kind apart), jittered inside their
    cell. Colour and kind are drawn independently per shape."""
    if not 1 <= max_shapes <= 4:
        raise ValueError(f"max_shapes must be in 1..4 (one shape per cell of a 2x2 grid), got {max_shapes}")
    if width < 32 or height < 32:
        raise ValueError(f"width and height must be >= 32 pixels, got {width}x{height}")
    cols, rows = {1: (1, 1), 2: (2, 1)}.get(max_shapes, (2, 2))
    n = rng.randint(1, max_shapes)
    cw, ch = width / cols, height / rows
    size = min(cw, ch) * 0.75
    slack_x, slack_y = (cw - size) / 2, (ch - size) / 2
    cells = rng.sample(range(cols * rows), n)
    shapes = []
    for cell in cells:
        col, row = cell % cols, cell // cols
        cx = (col + 0.5) * cw + rng.uniform(-slack_x, slack_x) * 0.8
        cy = (row + 0.5) * ch + rng.uniform(-slack_y, slack_y) * 0.8
        shapes.append(Shape(rng.choice(KINDS), rng.choice(list(COLOURS)), cx, cy, size))
    return Scene(width, height, shapes)


def draw(scene: Scene) -> Image.Image:
    """RGB picture of the scene: filled shapes on white. Triangles point up and fill half their bounding square."""
    img = Image.new("RGB", (scene.width, scene.height), (255, 255, 255))
    pen = ImageDraw.Draw(img)
    for s in scene.shapes:
        h = s.size / 2
        box = (s.cx - h, s.cy - h, s.cx + h, s.cy + h)
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(s.cx, s.cy - h), (s.cx + h, s.cy + h), (s.cx - h, s.cy + h)], fill=fill)
    return img


def _phrase(colour: str, kind: str, count: int) -> str:
    return f"{NUMBER_WORDS[count]} {colour} {kind}{'s' if count > 1 else ''}"


def describe(groups: Counter, order: list[tuple[str, str]] | None = None) -> str:
    """One sentence listing the groups, e.g. "A red circle, two blue squares and a yellow triangle."

    ``order``: the (colour, kind) keys in the order to mention them (default: sorted).
    """
    keys = list(order) if order is not None else sorted(groups)
    if sorted(keys) != sorted(k for k, c in groups.items() if c > 0):
        raise ValueError(f"order {keys} must list every group of {dict(groups)} exactly once")
    parts = [_phrase(colour, kind, groups[(colour, kind)]) for colour, kind in keys]
    if not parts:
        raise ValueError("cannot describe an empty scene")
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def corrupt(groups: Counter, rng: random.Random, what: str | None = None) -> tuple[Counter, str]:
    """A copy of ``groups`` with one attribute of one group changed: ``what`` in CORRUPTIONS (random if None).

    colour / kind: the whole group takes another colour / kind (merging with a group that already has it);
    count: the group's count becomes another value in 1..3. Returns (new groups, what was changed).
    """
    if what is None:
        what = rng.choice(CORRUPTIONS)
    if what not in CORRUPTIONS:
        raise ValueError(f"what must be one of {CORRUPTIONS} or None, got {what!r}")
    keys = sorted(k for k, c in groups.items() if c > 0)
    if not keys:
        raise ValueError("cannot corrupt an empty scene")
    colour, kind = key = rng.choice(keys)
    count = groups[key]
    out = Counter({k: c for k, c in groups.items() if c > 0})
    if what == "count":
        out[key] = rng.choice([c for c in range(1, MAX_COUNT + 1) if c != count])
        return out, what
    del out[key]
    if what == "colour":
        new_key = (rng.choice([c for c in COLOURS if c != colour]), kind)
    else:
        new_key = (colour, rng.choice([k for k in KINDS if k != kind]))
    out[new_key] += count
    return out, what


def _mention_order(groups: Counter, rng: random.Random) -> list[tuple[str, str]]:
    """Groups in a random order (so the position of a phrase says nothing about its truth)."""
    keys = sorted(k for k, c in groups.items() if c > 0)
    rng.shuffle(keys)
    return keys


@dataclass(slots=True)
class Example:
    """One picture with a correct and a wrong description (and which attribute the wrong one changed)."""

    scene: Scene
    prompt: str
    correct: str
    wrong: str
    corruption: str


def make_example(rng: random.Random, width: int = 112, height: int = 112, max_shapes: int = 3) -> Example:
    scene = random_scene(rng, width, height, max_shapes)
    truth = scene.groups()
    bad, what = corrupt(truth, rng)
    return Example(
        scene=scene,
        prompt=rng.choice(PROMPTS),
        correct=describe(truth, _mention_order(truth, rng)),
        wrong=describe(bad, _mention_order(bad, rng)),
        corruption=what,
    )


def _save(scene: Scene, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(scene).save(path, optimize=True)


def write_pairs(
    path: str | Path, n_images: int, *, seed: int, pairs_per_image: int = 1, image_dir: str | Path | None = None,
    prefix: str = "pair", width: int = 112, height: int = 112, max_shapes: int = 3,
) -> list[dict]:
    """Write preference pairs for ``n_images`` pictures (native pair JSONL: id, messages, chosen, rejected, images)
    and the PNGs.

    Each picture gets ``pairs_per_image`` pairs that share the correct description and differ in the wrong one;
    with up to 3 pairs per picture, each changes a different attribute (colour, kind, count). Images go to
    ``image_dir`` (default: ``<jsonl dir>/images``) and are referenced relative to the JSONL file. Each record also
    carries ``corruption`` (what the rejected reply got wrong); the pair loader ignores it.
    """
    if pairs_per_image < 1:
        raise ValueError(f"pairs_per_image must be >= 1, got {pairs_per_image}")
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    rng = random.Random(seed)
    records = []
    for i in range(n_images):
        scene = random_scene(rng, width, height, max_shapes)
        truth = scene.groups()
        img_path = image_dir / f"{prefix}-{i:05d}.png"
        _save(scene, img_path)
        kinds = rng.sample(CORRUPTIONS, len(CORRUPTIONS))
        for j in range(pairs_per_image):
            bad, what = corrupt(truth, rng, kinds[j % len(kinds)])
            records.append({
                "id": f"{prefix}-{i:05d}" + (f"-{j}" if pairs_per_image > 1 else ""),
                "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
                "chosen": describe(truth, _mention_order(truth, rng)),
                "rejected": describe(bad, _mention_order(bad, rng)),
                "images": [_relative(img_path, path.parent)],
                "corruption": what,
            })
    _write_jsonl(path, records)
    return records


def write_corpus(
    path: str | Path, n: int, *, seed: int, wrong_fraction: float = 0.3, image_dir: str | Path | None = None,
    prefix: str = "img", width: int = 112, height: int = 112, max_shapes: int = 3,
) -> list[dict]:
    """Write a scoring corpus of ``n`` samples (one picture each, user prompt + one assistant description).

    A ``round(wrong_fraction * n)`` of them (chosen at random) get a wrong description. Every record carries
    ``label`` ("correct" / "wrong") and, for wrong ones, ``corruption``; the scorer ignores both fields.
    """
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction must be in [0, 1], got {wrong_fraction}")
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / "images"
    rng = random.Random(seed)
    wrong = set(rng.sample(range(n), round(wrong_fraction * n)))
    records = []
    for i in range(n):
        ex = make_example(rng, width, height, max_shapes)
        img_path = image_dir / f"{prefix}-{i:03d}.png"
        _save(ex.scene, img_path)
        rec = {
            "id": f"{prefix}-{i:03d}",
            "messages": [
                {"role": "user", "content": ex.prompt},
                {"role": "assistant", "content": ex.wrong if i in wrong else ex.correct},
            ],
            "images": [_relative(img_path, path.parent)],
            "label": "wrong" if i in wrong else "correct",
        }
        if i in wrong:
            rec["corruption"] = ex.corruption
        records.append(rec)
    _write_jsonl(path, records)
    return records


def _relative(p: Path, base: Path) -> str:
    try:
        return str(p.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(p.resolve())


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(rec) + "\n" for rec in records)
