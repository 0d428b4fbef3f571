"""Training-log windows: totals over steps, throughput and the time spent waiting for data."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from catforge.potential.metrics import MetricTotals
from catforge.training.losses import LossResult
from catforge.training.window import MetricsWindow, timed


def slow_batches(delays: list[float]) -> Iterator[float]:
    for delay in delays:
        time.sleep(delay)
        yield delay


def test_timed_measures_the_wait_for_each_batch() -> None:
    delays = [0.0, 0.06, 0.02]
    pairs = list(timed(slow_batches(delays)))  # type: ignore[arg-type]
    assert [batch for batch, _ in pairs] == delays
    for delay, (_, waited) in zip(delays, pairs, strict=True):
        assert delay <= waited < delay + 0.05


def test_window_flush_gives_means_throughput_and_wait_fraction() -> None:
    window = MetricsWindow()
    totals = MetricTotals({"energy_mae": (torch.tensor(3.0), 4)})
    window.add(LossResult(torch.tensor(2.0)), 1.0, totals, 4, waited=0.01)
    window.add(LossResult(torch.tensor(4.0)), 3.0, totals, 6, waited=0.02)
    time.sleep(0.05)
    metrics = window.flush()
    assert metrics["loss"] == 3.0 and metrics["grad_norm"] == 2.0
    assert metrics["energy_mae"] == pytest.approx(6.0 / 8)
    assert 0.0 < metrics["data_wait_fraction"] <= 0.03 / 0.05
    assert 0.0 < metrics["structures_per_s"] <= 10 / 0.05
    assert window.count == 0 and window.flush()["loss"] == 0.0
