"""Utility accuracy: does the greedy answer contain the right answer? A task metric beside the utility NLL.

Two kinds of gold answer (:func:`gold_answer`):

* **math** (``category == "math"``): the numbers of the reference's final-answer clause (the text after its last
  "answer is" / "answer:"; else its last sentence), e.g. "The answer is Omar $18, Felix $24." -> (18, 24).
  A completion is correct when its *last* numbers equal them, in order (GSM8K-style final-number match;
  ``1,650`` = 1650, ``$`` and ``%`` ignored, a relative tolerance of 1e-6).
* **factual_qa** (short answers listed in ``data/utility_answers.jsonl``, by example id): correct when the
  normalised completion contains one of the normalised answers as whole words (SQuAD-style normalisation:
  lower case, punctuation and the articles a/an/the dropped). Free-text answers are sentences, so this is
  answer-containment exact match, as is usual for open generation; a completion listing several candidates
  is counted as correct.

Other examples have no gold answer and are not scored.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

__all__ = ["ANSWER_KINDS", "ANSWERS_FILE", "answer_correct", "answer_key", "final_numbers", "gold_answer",
           "normalise", "numbers"]

ANSWERS_FILE = Path(__file__).resolve().parents[2] / "data" / "utility_answers.jsonl"
ANSWER_KINDS = ("math", "factual_qa")

_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?|(?<![\w.])-?\.\d+")
_FINAL = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
_ARTICLES = {"a", "an", "the"}


def _plain(text: str) -> str:
    """NFKC, typographic minus signs as '-'."""
    return unicodedata.normalize("NFKC", text).replace("\u2212", "-").replace("\u2013", "-")


def numbers(text: str) -> list[float]:
    """Every number in ``text`` in order (thousands commas allowed; '$', '%' and units ignored)."""
    return [float(m.group().replace(",", "")) for m in _NUMBER.finditer(_plain(text))]


def final_numbers(reference: str) -> tuple[float, ...]:
    """The numbers of a reference solution's final-answer clause (see the module docstring)."""
    text = _plain(reference)
    found = list(_FINAL.finditer(text))
    if found:
        clause = text[found[-1].end():]
    else:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if numbers(s)]
        clause = sentences[-1] if sentences else ""
    return tuple(numbers(clause))


def normalise(text: str) -> list[str]:
    """Words of ``text``: lower case, punctuation dropped (inside numbers kept), articles dropped."""
    words = re.sub(r"[^\w.\-]+", " ", _plain(text).lower()).split()
    words = [w.strip(".-") if not re.fullmatch(r"-?\d+(?:\.\d+)?", w.rstrip(".")) else w.rstrip(".") for w in words]
    return [w for w in words if w and w not in _ARTICLES]


@lru_cache(maxsize=4)
def _answer_file(path: str) -> dict[str, tuple[str, ...]]:
    key: dict[str, tuple[str, ...]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            key[row["id"]] = tuple(row["answers"])
    return key


def answer_key(path: str | Path | None = None) -> Mapping[str, tuple[str, ...]]:
    """Short answers of the shipped factual questions: example id -> accepted answers."""
    return _answer_file(str(path if path is not None else ANSWERS_FILE))


def gold_answer(example, key: Mapping[str, tuple[str, ...]] | None = None) -> tuple[str, tuple] | None:
    """("math", numbers) or ("factual_qa", answers) for an example with a gold answer, else None."""
    key = answer_key() if key is None else key
    if example.id in key:
        return "factual_qa", tuple(key[example.id])
    if example.category == "math" and example.has_response:
        gold = final_numbers(example.response)
        return ("math", gold) if gold else None
    return None


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def answer_correct(kind: str, gold: Sequence, completion: str) -> bool:
    """Whether ``completion`` gets the gold answer (rules in the module docstring)."""
    if kind == "math":
        found = numbers(completion)
        tail = found[-len(gold):] if gold else []
        return len(tail) == len(gold) > 0 and all(_close(float(a), b) for a, b in zip(gold, tail))
    if kind == "factual_qa":
        words = normalise(completion)
        for answer in gold:
            target = normalise(answer)
            n = len(target)
            if n and any(words[i:i + n] == target for i in range(len(words) - n + 1)):
                return True
        return False
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {ANSWER_KINDS}")
