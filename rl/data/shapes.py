"""Synthetic scenes for the multimodal tasks: coloured shapes on a plain background, with captions
and counting questions. Generated in code, so the tiny VQ, the tiny CLIP and the multimodal RL tasks
need no download.

A scene is a JSON-able dict: {"background": name, "shapes": [{"shape", "color", "x", "y", "r"}]}.
`render` draws it as uint8 [H, W, 3] pixels; `caption` describes it ("a red circle and a blue square
on a white background"); `question` asks a count about it. Shapes sit in distinct cells of a 2x2
grid (jittered), so they never overlap and every caption word is visible in the picture.
"""
from __future__ import annotations

import random

import numpy as np

IMAGE_SIZE = 32
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
BACKGROUNDS = {"white": (235, 235, 235), "black": (25, 25, 25), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
MAX_SHAPES = 3
# The scene vocabulary, one tokenizer entry each in the tiny multimodal model (recipes/build_tiny_mmada.py):
# spelled out in byte-level pieces, a shape list is up to 38 tokens a tiny diffusion LM decodes in
# parallel into non-words ("yelld sqiargle"); as whole words it is at most 13.
WORDS = (*COLORS, *BACKGROUNDS, *SHAPES, "shape", "background")


def make_scene(rng: random.Random, size: int = IMAGE_SIZE) -> dict:
    cell = size // 2
    cells = rng.sample(range(4), rng.randint(1, MAX_SHAPES))
    shapes = []
    for c in sorted(cells):  # reading order: top-left, top-right, bottom-left, bottom-right
        r = rng.randint(cell * 5 // 16, cell * 7 // 16)
        jitter = cell // 2 - r
        shapes.append({"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
                       "x": (c % 2) * cell + cell // 2 + rng.randint(-jitter, jitter),
                       "y": (c // 2) * cell + cell // 2 + rng.randint(-jitter, jitter), "r": r})
    return {"background": rng.choice(list(BACKGROUNDS)), "shapes": shapes}


def render(scene: dict, size: int = IMAGE_SIZE) -> np.ndarray:
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene["background"]]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for s in scene["shapes"]:
        dx, dy, r = xx - s["x"], yy - s["y"], s["r"]
        if s["shape"] == "circle":
            inside = dx * dx + dy * dy <= r * r
        elif s["shape"] == "square":
            inside = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
        else:  # upward triangle: apex at the top, base at the bottom
            inside = (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
        img[inside] = COLORS[s["color"]]
    return img


def caption(scene: dict) -> str:
    parts = [f"a {s['color']} {s['shape']}" for s in scene["shapes"]]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{listed} on a {scene['background']} background"


def question(scene: dict, rng: random.Random) -> tuple[str, int]:
    """A counting question about the scene and its answer."""
    kind = rng.randrange(3)
    if kind == 0:
        color = rng.choice(list(COLORS))
        return f"How many {color} shapes?", sum(s["color"] == color for s in scene["shapes"])
    if kind == 1:
        shape = rng.choice(SHAPES)
        return f"How many {shape}s?", sum(s["shape"] == shape for s in scene["shapes"])
    return "How many shapes?", len(scene["shapes"])


def t2i_row(rng: random.Random) -> dict:
    scene = make_scene(rng)
    text = caption(scene)
    return {"prompt": text, "answer": text, "scene": scene, "mode": "t2i"}


def reasoning_row(rng: random.Random) -> dict:
    scene = make_scene(rng)
    q, n = question(scene, rng)
    listing = ", ".join(f"{s['color']} {s['shape']}" for s in scene["shapes"])
    return {"prompt": q, "answer": str(n), "scene": scene, "mode": "mmu",
            "solution": f"<think>{listing}</think><answer>{n}</answer>"}


def images_of(rows: list[dict]) -> np.ndarray:
    """[N, H, W, 3] uint8 pixels of the rows' scenes."""
    return np.stack([render(r["scene"]) for r in rows])
