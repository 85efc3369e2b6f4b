"""The benchmark plumbing (not its figures: speed and memory targets are read from `python -m jobs.bench`,
never asserted in tests): each subcommand's JSON has the fields the README quotes."""

from __future__ import annotations

import json
import os

import pytest

from jobs.bench import core_scaling, main


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"),
                    reason="needs two cores and Linux CPU affinity")
def test_core_scaling_reports_one_and_two_core_rates():
    result = core_scaling(seconds=0.3)
    for kind in ("stream", "matmul"):
        entry = result[kind]
        assert entry["one_core"] > 0 and len(entry["two_cores"]) == 2 and all(v > 0 for v in entry["two_cores"])
        assert entry["scaling_2_vs_1"] == pytest.approx(sum(entry["two_cores"]) / entry["one_core"])


def test_memory_bench_runs_each_setting_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert main(["memory", "--model", "tiny", "--settings", "gradient_checkpointing,packing", "--pairs", "2",
                 "--seq-len", "24", "--prompt-len", "8", "--micro-pairs", "2", "--steps", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    settings = [r["setting"] for r in result["settings"]]
    assert settings == ["baseline", "gradient_checkpointing", "packing"]  # the baseline is always measured first
    base, checkpointed, packed = result["settings"]
    assert result["ratios"]["baseline"] == 1.0 and all(r["peak_rss_mib"] > 0 for r in result["settings"])
    # The savers change memory, not the math: same losses as the baseline (float tolerance).
    for other in (checkpointed, packed):
        assert other["losses"] == pytest.approx(base["losses"], abs=1e-5)
    assert base["losses"][0] == pytest.approx(0.6931472, abs=1e-6)  # the reference is the starting policy
    assert packed["tokens_per_step"] < packed["padded_tokens_per_step"]  # the batch really has padding
