"""What the data pipeline did: rows read, bad rows skipped, tokens truncated, rows dropped.

Printed at start-up so that nothing is dropped or cut silently, and stored beside the cached
tokenisation so a cache hit reports the same figures.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

# Skipped rows quoted in the summary; the rest are only counted.
SHOWN_EXAMPLES = 5
# Counts printed even when zero, so a clean start-up says so.
ALWAYS_SHOWN = ("rows_read", "rows_skipped", "examples", "prompts_truncated",
                "completions_truncated", "dropped_prompt_too_long", "dropped_completion_too_long")


@dataclasses.dataclass
class DataReport:
    """Counts and notes collected while reading, normalising and tokenising one data source."""

    source: str = ""
    rows: tuple = ()
    format: str = ""
    conversational: bool = False
    kind: str = ""
    counts: Counter = dataclasses.field(default_factory=Counter)
    skipped: list = dataclasses.field(default_factory=list)

    def skip(self, err) -> None:
        """Records a bad row skipped on request (a DataError)."""
        self.counts["rows_skipped"] += 1
        self.skipped.append((err.row, err.field, err.reason))

    def merge(self, other: DataReport) -> None:
        """Adds another report's counts and skipped rows to this one."""
        self.counts.update(other.counts)
        self.skipped.extend(other.skipped)

    def to_json(self) -> str:
        """Serialises the report (for the tokenisation cache)."""
        return json.dumps(dict(dataclasses.asdict(self), counts=dict(self.counts)))

    @classmethod
    def from_json(cls, text: str) -> DataReport:
        """Inverse of to_json."""
        raw = json.loads(text)
        raw["counts"] = Counter(raw["counts"])
        raw["skipped"] = [tuple(s) for s in raw["skipped"]]
        raw["rows"] = tuple(raw["rows"])
        return cls(**raw)

    def summary(self) -> str:
        """A few human-readable lines: format, counts, and the first skipped rows."""
        style = "conversational" if self.conversational else "plain text"
        lines = [f"data {self.source}: format {self.format} ({style}), kind {self.kind}"]
        if self.rows:
            start, stop, total = self.rows
            lines.append(f"  this host reads rows [{start}, {stop}) of {total}")
        lines += [f"  {name}: {self.counts[name]}" for name in ALWAYS_SHOWN]
        lines += [f"  {name}: {count}" for name, count in sorted(self.counts.items())
                  if count and name not in ALWAYS_SHOWN]
        reasons = Counter(reason.split(":")[0].split(" (")[0] for _, _, reason in self.skipped)
        for reason, count in reasons.most_common():
            lines.append(f"  skipped ({reason}): {count}")
        for row, field, reason in self.skipped[:SHOWN_EXAMPLES]:
            lines.append(f"    e.g. row {row}, field {field!r}: {reason}")
        return "\n".join(lines)
