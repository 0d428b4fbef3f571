"""Training metrics between two log lines, and the time spent waiting for each batch."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from catforge.potential.metrics import MetricTotals
from catforge.training.losses import LossResult

Batch = TypeVar("Batch")


class MetricsWindow:
    """Training metrics accumulated between two log lines (totals, not averages of averages)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.count = 0
        self.loss = 0.0
        self.grad_norm = 0.0
        self.structures = 0
        self.data_wait = 0.0
        self.totals = MetricTotals()
        self.start = time.perf_counter()

    def add(
        self, result: LossResult, grad_norm: float, totals: MetricTotals, n: int, waited: float
    ) -> None:
        self.count += 1
        self.data_wait += waited
        self.loss += float(result.total.detach())
        self.grad_norm += grad_norm
        self.structures += n
        self.totals = self.totals + totals

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        metrics = self.totals.compute()
        metrics["loss"] = self.loss / max(self.count, 1)
        metrics["grad_norm"] = self.grad_norm / max(self.count, 1)
        metrics["structures_per_s"] = self.structures / elapsed  # this rank's
        metrics["data_wait_fraction"] = self.data_wait / elapsed
        self._reset()
        return metrics


def timed(batches: Iterable[Batch]) -> Iterator[tuple[Batch, float]]:
    """Each batch with the seconds spent waiting for it (loading and collating)."""
    iterator = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(iterator, None)
        if batch is None:
            return
        yield batch, time.perf_counter() - start
