"""Synthetic verifiable tasks generated in code, and the check of task rows (files: rl/data/files.py).

A task row is a dict with at least `prompt` (user message), `answer` (ground truth checked by a
reward) and `task` (its name); `solution` is a reference completion used for SFT. Countdown rows
also carry `numbers` and `target`. Long-task rows ("Count from a to b.") answer with every number
from a to b, scored on that chain (reward `exact` with prefix: what follows b is not scored).
"""
from __future__ import annotations

import inspect
import math
import random

from rl.data import shapes, sudoku

NAMES = ["Ann", "Ben", "Cal", "Dee", "Eva", "Finn", "Gus", "Hana",
         "Ivy", "Jon", "Kai", "Lea", "Max", "Nia", "Omar", "Pia"]
ITEMS = ["apples", "books", "coins", "cards", "eggs", "pens", "shells", "stamps", "toys", "marbles"]


def _arithmetic(rng: random.Random) -> dict:
    # Small numbers: a sub-2M-parameter model learns these facts in minutes of CPU training, and the
    # two-step kinds stay hard enough to leave room for RL.
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} now?"
        steps, ans = [f"{a}+{b}={a + b}"], a + b
    elif kind == 1:
        a = rng.randint(5, 30)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {item} and gives away {b}. How many are left?"
        steps, ans = [f"{a}-{b}={a - b}"], a - b
    elif kind == 2:
        a, b = rng.randint(2, 6), rng.randint(2, 6)
        q = f"{name} buys {a} bags of {b} {item}. How many {item} in all?"
        steps, ans = [f"{a}*{b}={a * b}"], a * b
    elif kind == 3:
        b = rng.randint(2, 5)
        ans = rng.randint(2, 6)
        a = b * ans
        q = f"{name} shares {a} {item} among {b} friends. How many each?"
        steps = [f"{a}/{b}={ans}"]
    elif kind == 4:
        a, b = rng.randint(2, 15), rng.randint(1, 15)
        c = rng.randint(1, a + b - 1)
        s = a + b
        q = f"{name} has {a} {item}, finds {b} and loses {c}. How many now?"
        steps, ans = [f"{a}+{b}={s}", f"{s}-{c}={s - c}"], s - c
    else:
        a, b, c = rng.randint(2, 5), rng.randint(2, 5), rng.randint(1, 9)
        p = a * b
        q = f"{name} has {a} boxes of {b} {item} and {c} more. How many in all?"
        steps, ans = [f"{a}*{b}={p}", f"{p}+{c}={p + c}"], p + c
    return {"prompt": q, "answer": str(ans), "solution": f"<think>{', '.join(steps)}</think><answer>{ans}</answer>"}


def _countdown(rng: random.Random) -> dict:
    # Build a target from a random expression over three numbers, keeping every value a positive integer.
    while True:
        nums = [rng.randint(1, 12) for _ in range(3)]
        order = nums[:]
        rng.shuffle(order)
        a, b, c = order
        op1, op2 = rng.choice("+-*"), rng.choice("+-*/")
        x = {"+": a + b, "-": a - b, "*": a * b}[op1]
        if x <= 0:
            continue
        if op2 == "/":
            if x % c:
                continue
            t = x // c
        else:
            t = {"+": x + c, "-": x - c, "*": x * c}[op2]
        if not 1 <= t <= 60:
            continue
        left = f"({a}{op1}{b})" if op1 in "+-" and op2 in "*/" else f"{a}{op1}{b}"
        eq = f"{left}{op2}{c}"
        q = f"Use {nums} to make {t}. Use + - * / and each number once."
        steps = f"{a}{op1}{b}={x}, {x}{op2}{c}={t}"
        return {"prompt": q, "answer": str(t), "numbers": nums, "target": t,
                "solution": f"<think>{steps}</think><answer>{eq}</answer>"}


# Tokens of a long-task answer besides its numbers: "<answer>" and "</answer>" (3 tokens each with the
# tiny tokenizer) and the end-of-turn token; every digit and space is one token (single-digit
# pre-tokenizer), so n numbers of 3 digits take 4n - 1.
LONG_OVERHEAD = 7
LONG_MAX_COUNT = 120


def long_count_range(length: int, fill: tuple[float, float] = (0.75, 0.9)) -> tuple[int, int]:
    """How many numbers make a long-task answer fill `fill` of `length` answer tokens."""
    lo = math.ceil((fill[0] * length - LONG_OVERHEAD + 1) / 4)
    hi = math.floor((fill[1] * length - LONG_OVERHEAD + 1) / 4)
    if not 2 <= lo <= hi <= LONG_MAX_COUNT:
        raise ValueError(f"task 'long': length {length} gives {lo}..{hi} numbers per answer; "
                         f"lengths from 32 to {int((4 * LONG_MAX_COUNT + LONG_OVERHEAD) / fill[1])} fit")
    return lo, hi


def _long(rng: random.Random, length: int | None = None) -> dict:
    # Count from a to b, every number written out: a chain of steps, each one derived from the last,
    # whose length the prompt sets. With `length`, the answer fills 75-90 % of that many tokens, as
    # a real GSM8K answer fills most of its 256 (bench/rollout.py --task long), so early stop cannot
    # skip what the answer really uses; its numbers then stay within one hundred (at most 100 of them,
    # 75-79 % of 512), since the tiny long-answer model misses carries into the hundreds digit.
    if length:
        lo, hi = long_count_range(length)
        n = rng.randint(lo, min(hi, 100))
        a = 100 * rng.randint(1, 9) + rng.randint(0, 100 - n)
    else:
        n = rng.randint(2, LONG_MAX_COUNT)
        a = rng.randint(100, 1000 - n)  # always 3 digits, so every step is 4 tokens
    chain = " ".join(str(x) for x in range(a, a + n))
    return {"prompt": f"Count from {a} to {a + n - 1}.", "answer": chain, "solution": f"<answer>{chain}</answer>"}


# Multimodal (rl/data/shapes.py): "t2i" draws the captioned scene, "shapes_qa" answers a counting
# question about a scene shown as image codes.
GENERATORS = {"arithmetic": _arithmetic, "countdown": _countdown, "long": _long, "sudoku": sudoku.generate,
              "t2i": shapes.t2i_row, "shapes_qa": shapes.reasoning_row}
# Split seeds are far apart so train and held-out rows come from disjoint random streams.
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_003}


def make_rows(task: str, n: int, seed: int = 0, split: str = "train", **options) -> list[dict]:
    """`options` go to the task's generator (`length` for task 'long')."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(GENERATORS)}")
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_OFFSETS)}")
    rng = random.Random(seed * 7919 + SPLIT_OFFSETS[split] + hash_task(task))
    generate = GENERATORS[task]
    if options:
        unknown = set(options) - set(inspect.signature(generate).parameters)
        if unknown:
            raise ValueError(f"task {task!r} takes no option {sorted(unknown)}")
    return [{**generate(rng, **options), "task": task} for _ in range(n)]


def hash_task(task: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(task))  # stable across processes, unlike hash()


def make_mixture(tasks: dict[str, int], seed: int = 0, split: str = "train") -> list[dict]:
    rows = [row for task, n in tasks.items() for row in make_rows(task, n, seed, split)]
    random.Random(seed).shuffle(rows)
    return rows


REQUIRED = ("prompt", "answer")
IMAGE_MODES = ("t2i", "mmu")  # rows that carry an image: the answer (t2i) or in the prompt (mmu)
MODES = ("text", *IMAGE_MODES)


ROLES = ("system", "user", "assistant")


def _check_messages(messages: list, where: str) -> None:
    # A chat prompt as verl/TRL datasets store it: [{"role": ..., "content": ...}, ...], ending with the
    # user's turn, since the answer is generated as the assistant's next turn (rl/data/encode.py).
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise ValueError(f"{where} 'prompt' message {j} is {m!r}, expected {{'role': one of {list(ROLES)}, "
                             f"'content': a string}}")
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{where} 'prompt' is a message list that does not end with a 'user' message")


def validate_rows(rows: list[dict], source: str, lines: list[int] | None = None) -> list[dict]:
    """One clear error naming the source, the row (and its line in a file) and the key, before
    anything trains on it. `prompt` is a string, or a chat message list for a text row."""
    if not rows:
        raise ValueError(f"{source}: no rows")
    for i, row in enumerate(rows):
        where = f"{source}:{lines[i]}: row {i}" if lines else f"{source}: row {i}"
        if not isinstance(row, dict):
            raise ValueError(f"{where} is {type(row).__name__}, expected an object with keys {REQUIRED}")
        mode = row.get("mode")
        if mode is not None and mode not in MODES:
            raise ValueError(f"{where} has mode {mode!r}, expected one of {list(MODES)}")
        for key in REQUIRED:
            value = row.get(key)
            if key == "prompt" and isinstance(value, list):
                if mode in IMAGE_MODES:
                    raise ValueError(f"{where} (mode {mode!r}) has a message-list 'prompt'; image rows take a string")
                _check_messages(value, where)
                continue
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError(f"{where} has no {key!r} (expected a non-empty string"
                                 f"{' or a chat message list' if key == 'prompt' else ''})")
            if not isinstance(value, (str, int, float)):
                raise ValueError(f"{where} key {key!r} is {type(value).__name__}, expected a string")
        if mode in IMAGE_MODES and not any(k in row for k in ("scene", "image", "image_codes")):
            raise ValueError(f"{where} (mode {mode!r}) needs an image: key 'image' (a file path), "
                             f"'image_codes' or 'scene'")
    return rows
