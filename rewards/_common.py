"""Text helpers and batch checks shared by the built-in rewards.

Everything here is linear in the length of the completion: completions are untrusted and may be
megabytes long, so no regex with nested quantifiers and no repeated rescans.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*\Z")
# No nested quantifiers, so finditer stays linear on long digit runs.
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def check_tag(tag: str, param: str, owner: str) -> str:
    if not isinstance(tag, str) or not _TAG_NAME.match(tag):
        raise ValueError(f"{owner}: {param} must be a tag name like 'answer' (letters, digits, _ or -), got {tag!r}")
    return tag


def last_tag_content(text: str, tag: str) -> str | None:
    """Content of the last complete <tag>...</tag> pair, or None."""
    close = text.rfind(f"</{tag}>")
    if close < 0:
        return None
    opening = f"<{tag}>"
    start = text.rfind(opening, 0, close)
    if start < 0:
        return None
    return text[start + len(opening): close]


def last_boxed_content(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces, or None (also when it is unclosed)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for i in range(begin - 1, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def last_number(text: str) -> str | None:
    """The last number in the text (thousands separators dropped), or None."""
    match = None
    for match in _NUMBER.finditer(text):
        pass
    return match.group(0).replace(",", "") if match else None


def check_batch(
    owner: str, prompts: Sequence[Any] | None, completions: Sequence[Any], columns: Mapping[str, Any]
) -> int:
    """Validate the uniform reward call (see rewards.registry) and return the batch size."""
    if isinstance(completions, (str, bytes)) or not isinstance(completions, Sequence):
        raise TypeError(f"reward {owner!r}: completions must be a list of strings, got {type(completions).__name__}")
    n = len(completions)
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise TypeError(f"reward {owner!r}: completions[{i}] is {type(c).__name__}, expected str")
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"reward {owner!r}: {len(prompts)} prompts for {n} completions (expected one per completion)")
    for key, value in columns.items():
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != n:
            got = f"length {len(value)}" if hasattr(value, "__len__") else type(value).__name__
            raise ValueError(
                f"reward {owner!r}: column {key!r} must be a list with one entry per completion ({n}), got {got}"
            )
    return n


def get_column(owner: str, columns: Mapping[str, Any], names: Iterable[str]) -> Sequence[Any]:
    """The first of `names` present in `columns`; a clear error listing what is there otherwise."""
    names = tuple(names)
    for name in names:
        if name in columns:
            return columns[name]
    wanted = " or ".join(repr(n) for n in names)
    raise ValueError(f"reward {owner!r} needs column {wanted}; the batch has columns {sorted(columns)}")
