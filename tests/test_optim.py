"""Optimizer param groups, OCP's LR schedule step by step, torch schedulers, EMA and clipping."""

from __future__ import annotations

import logging
from bisect import bisect
from typing import Any

import pytest
import torch
from torch import nn

from catforge.errors import ConfigError
from catforge.registry import SCHEDULERS
from catforge.training.optim import (
    ExponentialMovingAverage,
    LRSchedule,
    build_optimizer,
    build_scheduler,
    clip_gradients,
    resolve_schedule_steps,
    warmup_milestone_factor,
)


def ocp_warmup_lr_lambda(current_step: int, optim: dict[str, Any]) -> float:
    """Direct transcription of OCP V3 ``ocpmodels/common/utils.py:warmup_lr_lambda``."""
    if current_step <= optim["warmup_steps"]:
        alpha = current_step / float(optim["warmup_steps"])
        return optim["warmup_factor"] * (1.0 - alpha) + alpha
    else:
        idx = bisect(optim["lr_milestones"], current_step)
        return pow(optim["lr_gamma"], idx)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 3)
        self.frequencies = nn.Parameter(torch.ones(3))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return build_optimizer(Tiny(), "SGD", lr=lr)


def _step(schedule: LRSchedule) -> None:
    """An optimizer step (no gradients), then the per-batch scheduler step, as in training."""
    schedule.optimizer.step()
    schedule.step_batch()


@pytest.mark.parametrize(
    ("unit", "warmup", "milestones"),
    [("steps", 10, [20, 30, 35]), ("epochs", 1, [2, 3, 3.5]), ("fraction", 0.2, [0.4, 0.6, 0.7])],
)
def test_ocp_schedule_step_by_step(unit: str, warmup: float, milestones: list[float]) -> None:
    """10 steps/epoch, 50 steps in all: every unit resolves to warmup 10, milestones 20/30/35."""
    lr0 = 0.5
    optim = {
        "warmup_steps": 10,
        "warmup_factor": 0.2,
        "lr_milestones": [20, 30, 35],
        "lr_gamma": 0.1,
    }
    optimizer = _optimizer(lr0)
    schedule = build_scheduler(
        optimizer, None, steps_per_epoch=10, total_steps=50, warmup=warmup, warmup_factor=0.2,
        milestones=milestones, gamma=0.1, unit=unit,  # type: ignore[arg-type]
    )  # fmt: skip
    reference_optimizer = _optimizer(lr0)
    reference = torch.optim.lr_scheduler.LambdaLR(
        reference_optimizer, lambda x: ocp_warmup_lr_lambda(x, optim)
    )
    for step in range(50):
        expected = lr0 * ocp_warmup_lr_lambda(step, optim)
        assert schedule.lr == pytest.approx(expected, rel=1e-12), step
        assert schedule.lr == pytest.approx(reference.get_last_lr()[0], rel=1e-12)
        _step(schedule)
        reference_optimizer.step()
        reference.step()


def test_factor_uses_bisect_right_at_milestones() -> None:
    def factor(step: int) -> float:
        return warmup_milestone_factor(step, 5, 0.2, [10, 20], 0.5)

    assert factor(0) == pytest.approx(0.2)
    assert factor(5) == 1.0
    assert factor(9) == 1.0
    assert factor(10) == 0.5  # decayed *at* the milestone (bisect_right)
    assert factor(20) == 0.25
    assert warmup_milestone_factor(3, 0, 0.2, [2], 0.5) == 0.5  # no warmup, no division by zero


def test_resolve_schedule_steps() -> None:
    assert resolve_schedule_steps([1, 2.5], "epochs", 100, 1000) == (100, 250)
    assert resolve_schedule_steps(0.25, "fraction", 100, 1000) == (250,)
    assert resolve_schedule_steps([7812, 12500], "steps", 100, 1000) == (7812, 12500)
    with pytest.raises(ConfigError, match="fraction"):
        resolve_schedule_steps([1.5], "fraction", 100, 1000)
    with pytest.raises(ConfigError, match="whole"):
        resolve_schedule_steps([2.5], "steps", 100, 1000)
    with pytest.raises(ConfigError, match="unit"):
        resolve_schedule_steps([1], "hours", 100, 1000)  # type: ignore[arg-type]


def test_schedule_state_dict_resumes() -> None:
    def make() -> LRSchedule:
        return build_scheduler(
            _optimizer(), None, steps_per_epoch=10, total_steps=100, warmup=5, milestones=[8, 12]
        )

    first = make()
    for _ in range(7):
        _step(first)
    second = make()
    second.load_state_dict(first.state_dict())
    second.optimizer.load_state_dict(first.optimizer.state_dict())
    for _ in range(8):
        assert second.lr == pytest.approx(first.lr)
        _step(first)
        _step(second)


def test_constant_and_null(caplog: pytest.LogCaptureFixture) -> None:
    schedule = build_scheduler(_optimizer(), None, steps_per_epoch=10, total_steps=100)
    with caplog.at_level(logging.WARNING):
        null = build_scheduler(
            _optimizer(), "Null", steps_per_epoch=10, total_steps=100, milestones=[200]
        )
    assert "ignored" in caplog.text
    for _ in range(5):
        _step(schedule)
        _step(null)
    assert schedule.lr == null.lr == 0.1
    assert schedule.state_dict() == {}


def test_torch_scheduler_by_name_with_kwargs() -> None:
    schedule = build_scheduler(
        _optimizer(),
        "StepLR",
        steps_per_epoch=10,
        total_steps=100,
        params={"step_size": 3, "gamma": 0.5},
    )
    lrs = []
    for _ in range(7):
        lrs.append(schedule.lr)
        _step(schedule)
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    cosine = build_scheduler(_optimizer(), "CosineAnnealingLR", steps_per_epoch=10, total_steps=20)
    assert isinstance(cosine.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert cosine.scheduler.T_max == 20  # defaulted to the run length
    assert "OneCycleLR" in SCHEDULERS and "LambdaLR" in SCHEDULERS


def test_torch_scheduler_kwarg_errors() -> None:
    with pytest.raises(ConfigError, match="step_size"):
        build_scheduler(
            _optimizer(), "StepLR", steps_per_epoch=1, total_steps=9, params={"step_sise": 3}
        )
    with pytest.raises(ConfigError, match="needs"):
        build_scheduler(_optimizer(), "StepLR", steps_per_epoch=1, total_steps=9)
    with pytest.raises(ConfigError, match="last_epoch"):
        build_scheduler(
            _optimizer(), "StepLR", steps_per_epoch=1, total_steps=9,
            params={"step_size": 3, "last_epoch": 4},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="StepLR"):
        build_scheduler(_optimizer(), "StepLr", steps_per_epoch=1, total_steps=9)


def test_reduce_on_plateau_steps_at_eval_only() -> None:
    schedule = build_scheduler(
        _optimizer(), "ReduceLROnPlateau", steps_per_epoch=1, total_steps=9,
        params={"patience": 0, "factor": 0.5}, metric=("energy_mae", "min"),
    )  # fmt: skip
    for _ in range(5):
        _step(schedule)
    assert schedule.lr == 0.1
    schedule.step_eval(1.0)
    schedule.step_eval(0.5)  # improved
    assert schedule.lr == 0.1
    schedule.step_eval(0.7)  # worse, patience 0
    assert schedule.lr == pytest.approx(0.05)


def test_reduce_on_plateau_keeps_the_configs_mode_and_warns(caplog) -> None:
    """As OCP: ``mode`` goes to torch as given (default ``min``); a warning when it is not the
    direction of the metric the schedule steps on."""
    for params in ({"mode": "min"}, {}):
        with caplog.at_level(logging.WARNING, logger="catforge.training.optim"):
            schedule = build_scheduler(
                _optimizer(), "ReduceLROnPlateau", steps_per_epoch=1, total_steps=9,
                params=params, metric=("energy_force_within_threshold", "max"),
            )  # fmt: skip
        assert schedule.scheduler.mode == "min"
        assert "with mode 'min'" in caplog.text and "optim.mode: max" in caplog.text
        caplog.clear()
    with caplog.at_level(logging.WARNING, logger="catforge.training.optim"):
        schedule = build_scheduler(
            _optimizer(), "ReduceLROnPlateau", steps_per_epoch=1, total_steps=9,
            params={"mode": "max"}, metric=("energy_force_within_threshold", "max"),
        )  # fmt: skip
    assert schedule.scheduler.mode == "max" and not caplog.text


def test_optimizer_param_groups_without_decay() -> None:
    model = Tiny()
    optimizer = build_optimizer(model, "AdamW", lr=1e-3, weight_decay=0.1)
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = {
        g["weight_decay"]: {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups
    }
    assert groups == {0.1: {"lin.weight"}, 0.0: {"embedding.weight", "lin.bias", "frequencies"}}
    plain = build_optimizer(model, "AdamW", lr=1e-3)
    assert len(plain.param_groups) == 1
    assert plain.param_groups[0]["weight_decay"] == 0.01  # not set: AdamW's, as OCP
    none = build_optimizer(model, "AdamW", lr=1e-3, weight_decay=0.0)
    assert [g["weight_decay"] for g in none.param_groups] == [0.0]
    adam = build_optimizer(model, "Adam", lr=1e-3, optimizer_params={"betas": (0.8, 0.9)})
    assert adam.param_groups[0]["betas"] == (0.8, 0.9)


def test_optimizer_errors() -> None:
    with pytest.raises(ConfigError, match="AdamW"):
        build_optimizer(Tiny(), "AdamWW", lr=1e-3)
    with pytest.raises(ConfigError, match="amsgrad"):
        build_optimizer(Tiny(), "AdamW", lr=1e-3, optimizer_params={"amsgrd": True})
    with pytest.raises(ConfigError, match="weight_decay is given both"):
        build_optimizer(
            Tiny(), "AdamW", lr=1e-3, weight_decay=0.1, optimizer_params={"weight_decay": 0.1}
        )
    with pytest.raises(ConfigError, match="weight_decay"):
        build_optimizer(Tiny(), "Rprop", lr=1e-3, weight_decay=0.1)


def test_ema_matches_manual_and_swaps() -> None:
    model = nn.Linear(3, 2)
    decay = 0.9
    ema = ExponentialMovingAverage(model.parameters(), decay)
    manual = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update()
        manual = [
            s + (1 - decay) * (p.detach() - s)
            for s, p in zip(manual, model.parameters(), strict=True)
        ]
    for s, m in zip(ema.shadow_params, manual, strict=True):
        torch.testing.assert_close(s, m)
    trained = [p.detach().clone() for p in model.parameters()]
    with ema.average_parameters():
        for p, m in zip(model.parameters(), manual, strict=True):
            torch.testing.assert_close(p.detach(), m)
    for p, t in zip(model.parameters(), trained, strict=True):
        torch.testing.assert_close(p.detach(), t)
    state = ema.state_dict()
    assert set(state) == {"decay", "num_updates", "shadow_params", "collected_params"}
    other = ExponentialMovingAverage(nn.Linear(3, 2).parameters(), 0.5)
    other.load_state_dict(state)
    other.copy_to()
    for q, m in zip(other.parameters, manual, strict=True):
        torch.testing.assert_close(q.detach(), m)


def test_clip_gradients_returns_pre_clip_norm() -> None:
    model = nn.Linear(4, 3)
    model.weight.grad = torch.full_like(model.weight, 2.0)  # 12 entries
    model.bias.grad = torch.full_like(model.bias, 2.0)  # 3 entries
    expected = (15 * 4.0) ** 0.5
    assert clip_gradients(model.parameters(), None).item() == pytest.approx(expected)
    assert model.weight.grad[0, 0].item() == 2.0  # untouched without max_norm
    assert clip_gradients(model.parameters(), 1.0).item() == pytest.approx(expected)
    assert clip_gradients(model.parameters(), None).item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ConfigError):
        clip_gradients(model.parameters(), 0.0)
