"""Per-step metrics to JSONL (appended as they come), CSV (rewritten on close), TensorBoard, and, when
the driver is connected to Ray, live gauges on the cluster's Prometheus endpoint (``ray.util.metrics``).

Gauge names are the metric keys made Prometheus-safe under a ``rayalign_`` prefix
(``actor/pg_loss`` -> ``rayalign_actor_pg_loss``; Ray's exporter adds its own ``ray_`` in front), tagged
with ``run`` (the run folder's name) and ``job_name`` (the driver, e.g. ``dpo``). The tag is not called
``job`` because Prometheus attaches its own ``job`` label to every scraped target and would rename ours.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from pathlib import Path

import pandas as pd

from jobs.run.run_folder import before_first_write

METRIC_PREFIX = "rayalign_"
TAG_KEYS = ("run", "job_name")


class MetricsLogger:
    def __init__(self, folder: str | Path, tensorboard: bool = True, *, run: str | None = None,
                 job_name: str | None = None, export_to_ray: bool = True, resume_rows: list[dict] | None = None):
        """A fresh run starts new metrics files; a resumed one (``resume_rows``: the rows a checkpoint
        kept) rewrites them with exactly those rows, dropping what was logged after that checkpoint: the
        JSONL and CSV files, and TensorBoard's events, which are rebuilt from the rows (old event files
        are removed; ``purge_step`` would only hide the dropped steps from readers that honour it)."""
        self.folder = Path(folder)
        before_first_write(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.folder / "metrics.jsonl"
        self.csv_path = self.folder / "metrics.csv"
        self.rows: list[dict] = [dict(r) for r in resume_rows or []]
        self._file = self.jsonl_path.open("w")
        for row in self.rows:
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.csv_path.exists():  # a killed run's CSV (written on close) may hold later rows
            self._write_csv(self.rows)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            events = self.folder / "tensorboard"
            for old in events.glob("events.out.tfevents.*") if events.is_dir() else ():
                old.unlink()
            self._tb = SummaryWriter(str(events))
            for row in self.rows:
                self._tb_scalars(row)
        self._tags = {"run": run or self.folder.name, "job_name": job_name or driver_name()}
        self._export_to_ray = export_to_ray
        self._ray: RayGaugeExporter | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self._tb_scalars(row)
        exporter = self._ray_exporter()
        if exporter is not None:
            exporter.set({k: v for k, v in row.items() if _is_finite_number(v)})

    def _tb_scalars(self, row: dict) -> None:
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, row["step"])

    def _write_csv(self, rows: list[dict]) -> None:
        pd.DataFrame(rows).to_csv(self.csv_path, index=False)

    def close(self) -> None:
        if self._ray is not None:
            self._ray.stop()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.jsonl_path.exists():
            rows = [json.loads(line) for line in self.jsonl_path.read_text().splitlines() if line.strip()]
            self._write_csv(rows)

    def _ray_exporter(self) -> RayGaugeExporter | None:
        """Created on first use: drivers build the logger after (or without) connecting to Ray."""
        if self._ray is None and self._export_to_ray and _ray_connected():
            self._ray = RayGaugeExporter(self._tags)
        return self._ray


class RayGaugeExporter:
    """One ``ray.util.metrics.Gauge`` per metric key, holding the latest value of this run.

    Ray's metrics agent evicts a gauge series that has not been re-reported for two report intervals
    (10 s each by default), and a training step can take longer than that; a background thread
    therefore re-sets the latest values every half interval until ``stop()``, so a run's series stays
    on the endpoint for as long as the run is alive and ages out once it ends.
    """

    def __init__(self, tags: dict[str, str], refresh_s: float | None = None):
        self.tags = {k: str(v) for k, v in tags.items()}
        self.latest: dict[str, float] = {}
        self._gauges: dict[str, object] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.refresh_s = refresh_s or _refresh_interval_s()
        self._thread = threading.Thread(target=self._refresh, name="rayalign-metrics", daemon=True)
        self._thread.start()

    def set(self, scalars: dict[str, float]) -> None:
        with self._lock:
            for key, value in scalars.items():
                name = metric_name(key)
                self.latest[name] = float(value)
                self._record(name, key)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _record(self, name: str, key: str) -> None:
        try:
            gauge = self._gauges.get(name)
            if gauge is None:
                from ray.util.metrics import Gauge

                gauge = self._gauges[name] = Gauge(name, description=f"rayalign training metric '{key}'",
                                                   tag_keys=TAG_KEYS)
            gauge.set(self.latest[name], tags=self.tags)
        except Exception as exc:  # metrics must never stop training
            print(f"[metrics] could not export {name}: {exc}", file=sys.stderr)

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            if not _ray_connected():
                return
            with self._lock:
                for name in list(self.latest):
                    self._record(name, name)


def metric_name(key: str) -> str:
    """``actor/pg_loss`` -> ``rayalign_actor_pg_loss``: letters, digits and ``_`` only (Prometheus rules)."""
    body = re.sub(r"[^A-Za-z0-9_]+", "_", key).strip("_")
    return METRIC_PREFIX + (body or "value")


def driver_name() -> str:
    """``dpo`` for ``python -m jobs.dpo``; the script's stem otherwise."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        name = spec.name
        return name.rsplit(".", 1)[-1] if name.startswith("jobs.") else name
    path = getattr(main, "__file__", None)
    return Path(path).stem if path else "python"


def _refresh_interval_s() -> float:
    try:
        import ray

        report_ms = ray._config.metrics_report_interval_ms()
    except Exception:
        report_ms = 10_000
    return min(5.0, max(0.25, report_ms / 2000.0))


def _ray_connected() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:
        return False


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value
