"""Multiple-choice answers (M3D-VQA closed, M3D-Bench task 3): the letter a prediction picks, and
accuracy overall and per question type."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["QUESTION_TYPES", "choice_metrics", "parse_choice"]

QUESTION_TYPES = {"1": "plane", "2": "phase", "3": "organ", "4": "abnormality", "5": "position"}

# A letter alone or followed by punctuation ("B", "B.", "(B) liver"); "A lesion" is an article.
_LETTER = re.compile(r"^\W*([ABCD])(?:[.):,]|\s*$)")

_CHOICES = re.compile(r"Choices:\s*A\.\s*(.*?)\s+B\.\s*(.*?)\s+C\.\s*(.*?)\s+D\.\s*(.*?)\s*$", re.DOTALL)


def _choices(question: str) -> list[str] | None:
    match = _CHOICES.search(question)
    return None if match is None else [c.strip().rstrip(".").lower() for c in match.groups()]


def parse_choice(prediction: str, question: str) -> str | None:
    """The letter a prediction picks: a leading A-D (`B`, `B.`, `(B) liver`), else the one choice whose
    text it contains; None when neither is clear."""
    match = _LETTER.match(prediction or "")
    if match:
        return match.group(1)
    choices = _choices(question)
    text = (prediction or "").lower()
    if not choices or not text.strip():
        return None
    hits = [letter for letter, choice in zip("ABCD", choices) if choice and choice in text]
    return hits[0] if len(hits) == 1 else None


def choice_metrics(records: Sequence[Mapping[str, Any]], types: Mapping[str, str]) -> dict[str, Any]:
    """Multiple-choice accuracy overall and per question type (`types`: record id -> type number).

    The reference letter is the first character of the answer (`B. liver`); an unparsable prediction
    counts as wrong and in `unparsed`.
    """
    if not records:
        raise ValueError("choice_metrics needs at least one record")
    groups: dict[str, list[bool]] = defaultdict(list)
    hits, unparsed = [], 0
    for record in records:
        picked = parse_choice(record["prediction"], record.get("question", ""))
        unparsed += picked is None
        hit = picked is not None and picked == record["answer"].strip()[:1]
        hits.append(hit)
        number = str(types.get(record["id"], "?"))
        groups[QUESTION_TYPES.get(number, f"type {number}")].append(hit)
    by_type = {name: {"n": len(g), "accuracy": sum(g) / len(g)} for name, g in sorted(groups.items())}
    return {"n": len(hits), "accuracy": sum(hits) / len(hits), "unparsed": unparsed, "by_type": by_type}
