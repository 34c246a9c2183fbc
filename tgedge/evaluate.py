"""Task accuracy: exact match of greedy answers against a data folder, overall and per question type."""

from __future__ import annotations

import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tgedge.data.folder import Record


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().strip(string.punctuation + " ").split())


def chance_levels(records: list[Record]) -> dict[str, float]:
    """Per type, the accuracy of always giving that type's most common answer (a majority-class baseline)."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        by_type[r.type or "all"][normalize(r.answer)] += 1
    return {t: c.most_common(1)[0][1] / sum(c.values()) for t, c in by_type.items()}


@dataclass
class EvalReport:
    total: int = 0
    correct: int = 0
    per_type: dict[str, dict] = field(default_factory=dict)
    chance: float = 0.0
    failures: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {"total": self.total, "correct": self.correct, "accuracy": self.accuracy, "chance": self.chance,
                "per_type": self.per_type, "failures": self.failures}


def evaluate(answer_fn, records: list[Record], progress=None, max_failures: int = 20) -> EvalReport:
    """`answer_fn(image_path, prompt) -> text` for each record that has an answer."""
    records = [r for r in records if r.answer is not None]
    chance = chance_levels(records)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    report = EvalReport()
    for r in records:
        with r.errors():
            got = answer_fn(r.image, r.prompt)
        ok = normalize(got) == normalize(r.answer)
        kind = r.type or "all"
        counts[kind][0] += 1
        counts[kind][1] += ok
        report.total += 1
        report.correct += ok
        if not ok and len(report.failures) < max_failures:
            report.failures.append({"line": r.line, "image": r.image.name, "prompt": r.prompt, "expected": r.answer,
                                    "got": got, "type": kind})
        if progress is not None:
            progress()
    report.per_type = {k: {"n": n, "correct": c, "accuracy": c / n, "chance": chance[k]}
                       for k, (n, c) in sorted(counts.items())}
    report.chance = sum(chance[k] * n for k, (n, _) in counts.items()) / max(report.total, 1)
    return report
