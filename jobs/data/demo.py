"""The embedded demo prompts: review openings shipped as a data file beside this package."""

from __future__ import annotations

from pathlib import Path

from jobs.data.records import PromptRecord


REVIEW_OPENINGS_FILE = Path(__file__).with_name("review_openings.txt")


def _read_openings(path: Path = REVIEW_OPENINGS_FILE) -> tuple[str, ...]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


# The embedded openings (jobs/data/review_openings.txt, shipped with the package).
DEMO_REVIEW_OPENINGS: tuple[str, ...] = _read_openings()


def demo_prompts() -> list[PromptRecord]:
    """The embedded review openings as prompts (no dataset needed)."""
    return [PromptRecord(text, {}, f"demo: row {number}")
            for number, text in enumerate(DEMO_REVIEW_OPENINGS, start=1)]
