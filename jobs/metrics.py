"""Per-step metrics to JSONL (appended as they come), CSV (rewritten on close) and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd


class MetricsLogger:
    def __init__(self, folder: str | Path, tensorboard: bool = True):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.folder / "metrics.jsonl"
        self.csv_path = self.folder / "metrics.csv"
        self.rows: list[dict] = []
        self._file = self.jsonl_path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.folder / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.jsonl_path.exists():
            rows = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line.strip()]
            pd.DataFrame(rows).to_csv(self.csv_path, index=False)


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value
