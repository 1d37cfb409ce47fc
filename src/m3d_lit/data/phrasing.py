"""Wording of the brain-CT questions, answers and findings reports.

Every option list starts with the canonical wording (used for val/test and when no rng is given);
training picks among all options with a seeded `random.Random`. Answers stay short and regular so that
BLEU/ROUGE/METEOR reward the findings rather than the phrasing. Findings use the CQ500 names
(`ICH`, `IPH`, ..., `MidlineShift`); a key that is absent was not assessed and is never mentioned.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

__all__ = [
    "CLOSED_FINDINGS",
    "HEMORRHAGE_TYPES",
    "closed_answer",
    "closed_question",
    "findings_report",
    "hemorrhage_phrase",
    "open_answer",
    "open_question",
    "pick",
    "seg_answer",
    "seg_question",
]

# The order: intraparenchymal, intraventricular, subdural, epidural, subarachnoid.
TYPE_NAMES = {
    "IPH": "intraparenchymal",
    "IVH": "intraventricular",
    "SDH": "subdural",
    "EDH": "epidural",
    "SAH": "subarachnoid",
}
HEMORRHAGE_TYPES = tuple(TYPE_NAMES)

# Closed CQ500 findings -> (article, noun); the article is dropped in the negative answers.
CLOSED_FINDINGS = {
    "ChronicBleed": ("a ", "chronic bleed"),
    "Fracture": ("a ", "fracture"),
    "CalvarialFracture": ("a ", "calvarial fracture"),
    "MassEffect": ("", "mass effect"),
    "MidlineShift": ("a ", "midline shift"),
}

CLOSED_QUESTIONS = ("Is there {a}{x}?", "Does this scan show {a}{x}?", "Can you see {a}{x} in this image?")
CLOSED_YES = ("Yes, there is {a}{x}.", "Yes, {a}{x} is present.", "Yes, the scan shows {a}{x}.")
CLOSED_NO = ("No, there is no {x}.", "No, {a}{x} is not seen.", "No, the scan shows no {x}.")

OPEN_QUESTIONS = {
    True: (
        "Is there intracranial hemorrhage? If so, what type and on which side?",
        "Does this scan show any intracranial bleeding? If yes, name the type and the side.",
        "Is a hemorrhage visible in this head CT? If so, which type is it and on which side?",
    ),
    False: (
        "Is there intracranial hemorrhage? If so, what type?",
        "Does this scan show any intracranial bleeding? If yes, name the type.",
        "Is a hemorrhage visible in this head CT? If so, which type is it?",
    ),
}
OPEN_YES = ("{X}.", "There is {x}.", "The scan shows {x}.")
OPEN_NO = (
    "No intracranial hemorrhage.",
    "There is no intracranial hemorrhage.",
    "The scan shows no intracranial hemorrhage.",
)

SEG_QUESTIONS = (
    "Segment the hemorrhage.",
    "Can you segment the hemorrhage in this image?",
    "Please segment the bleeding in this scan.",
)
SEG_YES = ("Here is the hemorrhage: [SEG].", "It is [SEG].", "The hemorrhage is at [SEG].")
SEG_NO = (
    "There is no hemorrhage to segment.",
    "Sorry, there is no hemorrhage in this scan.",
    "No hemorrhage is visible, so there is nothing to segment.",
)

REPORT_FRAMES = ("{X}.", "Findings include {x}.", "Seen: {x}.")
NORMAL_FRAMES = ("Normal scan: no {x}.", "No {x} is seen.", "The scan is normal, with no {x}.")


def pick(options: Sequence[str], rng: random.Random | None) -> str:
    """The canonical option (index 0) without an rng, else a seeded choice."""
    return options[0] if rng is None else rng.choice(options)


def _join(words: Sequence[str], last: str = "and") -> str:
    if len(words) <= 1:
        return "".join(words)
    return f"{', '.join(words[:-1])} {last} {words[-1]}"


def _fill(template: str, phrase: str) -> str:
    return template.format(x=phrase, X=phrase[:1].upper() + phrase[1:])


def hemorrhage_phrase(findings: Mapping[str, int]) -> str | None:
    """E.g. "intraparenchymal and subdural hemorrhage on the left side"; None without hemorrhage."""
    types = [name for key, name in TYPE_NAMES.items() if findings.get(key)]
    if not (findings.get("ICH") or types):
        return None
    phrase = f"{_join(types)} hemorrhage" if types else "intracranial hemorrhage"
    left, right = findings.get("BleedLocation-Left"), findings.get("BleedLocation-Right")
    if left and right:
        return f"{phrase} on both sides"
    if left or right:
        return f"{phrase} on the {'left' if left else 'right'} side"
    return phrase


def open_question(with_side: bool, rng: random.Random | None = None) -> str:
    """The open hemorrhage question; `with_side` asks for the side too (CQ500)."""
    return pick(OPEN_QUESTIONS[with_side], rng)


def open_answer(findings: Mapping[str, int], rng: random.Random | None = None) -> str:
    """The types and side found, or that there is no hemorrhage."""
    phrase = hemorrhage_phrase(findings)
    return pick(OPEN_NO, rng) if phrase is None else _fill(pick(OPEN_YES, rng), phrase)


def _closed_noun(finding: str) -> tuple[str, str]:
    if finding not in CLOSED_FINDINGS:
        raise ValueError(f"no closed question for finding {finding!r}; known: {sorted(CLOSED_FINDINGS)}")
    return CLOSED_FINDINGS[finding]


def closed_question(finding: str, rng: random.Random | None = None) -> str:
    article, noun = _closed_noun(finding)
    return pick(CLOSED_QUESTIONS, rng).format(a=article, x=noun)


def closed_answer(finding: str, value: int, rng: random.Random | None = None) -> str:
    """Begins with exactly `Yes` or `No`."""
    article, noun = _closed_noun(finding)
    return pick(CLOSED_YES if value else CLOSED_NO, rng).format(a=article, x=noun)


def seg_question(rng: random.Random | None = None) -> str:
    return pick(SEG_QUESTIONS, rng)


def seg_answer(hemorrhage: int, rng: random.Random | None = None) -> str:
    """Contains `[SEG]` exactly when there is hemorrhage."""
    return pick(SEG_YES if hemorrhage else SEG_NO, rng)


def _fracture_phrase(findings: Mapping[str, int]) -> str | None:
    calvarial, other = findings.get("CalvarialFracture"), findings.get("OtherFracture")
    if calvarial and other:
        return "calvarial fracture and another fracture"
    if calvarial:
        return "calvarial fracture"
    if other:
        return "non-calvarial fracture"
    return "fracture" if findings.get("Fracture") else None


def _mass_phrase(findings: Mapping[str, int]) -> str | None:
    mass, shift = findings.get("MassEffect"), findings.get("MidlineShift")
    if mass and shift:
        return "mass effect with midline shift"
    if mass or shift:
        return "mass effect" if mass else "midline shift"
    return None


def _assessed(findings: Mapping[str, int]) -> list[str]:
    groups = {
        "hemorrhage": ("ICH", *HEMORRHAGE_TYPES),
        "fracture": ("Fracture", "CalvarialFracture", "OtherFracture"),
        "mass effect": ("MassEffect",),
        "midline shift": ("MidlineShift",),
    }
    return [name for name, keys in groups.items() if any(k in findings for k in keys)]


def findings_report(findings: Mapping[str, int], rng: random.Random | None = None) -> str:
    """A short findings report naming every positive finding, or stating a normal scan.

    Args:
        findings: finding name (CQ500 names) -> 0/1; absent keys were not assessed.
        rng: picks a sentence frame per sentence (training); None gives the canonical report.
    """
    hemorrhage = hemorrhage_phrase(findings)
    chronic = "chronic bleed" if findings.get("ChronicBleed") else None
    positives = [p for p in (chronic, _fracture_phrase(findings), _mass_phrase(findings)) if p]
    if hemorrhage is None and not positives:
        return _fill(pick(NORMAL_FRAMES, rng), _join(_assessed(findings) or ["abnormality"], "or"))
    sentences = [pick(OPEN_NO, rng)] if hemorrhage is None else [_fill(pick(REPORT_FRAMES, rng), hemorrhage)]
    sentences += [_fill(pick(REPORT_FRAMES, rng), phrase) for phrase in positives]
    return " ".join(sentences)
