"""The health monitor's pure logic: EMA statistics, classification, LR backoff and recovery,
rollback after K consecutive incidents, stop after M rollbacks, checkpoint state; the fault
injector; and the skip guard on a plain (ZeRO-0) torch optimizer."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from ava.config import ConfigError, HealthConfig, InjectConfig
from ava.observe.callbacks import CONTINUE, ROLLBACK, STOP
from ava.train.faults import FaultInjector
from ava.train.health import (
    GRAD_SPIKE,
    HEALTHY,
    LOSS_SPIKE,
    NONFINITE_GRAD,
    NONFINITE_LOSS,
    OVERFLOW,
    EmaStat,
    HealthMonitor,
    UnhealthyRun,
)
from ava.train.step_guard import StepGuard

CFG = HealthConfig(warmup_steps=5, recovery_after=2, recovery_steps=4, rollback_after=3,
                   max_rollbacks=1)


def warmed(cfg: HealthConfig = CFG, steps: int = 10) -> HealthMonitor:
    mon = HealthMonitor(cfg)
    for i in range(steps):  # loss ~3 +- 0.1, grad norm ~1 +- 0.05
        v = mon.classify(3.0 + 0.1 * (-1) ** i, 1.0 + 0.05 * (-1) ** i)
        assert v.kind == HEALTHY
        assert mon.update(v, i + 1) == CONTINUE
    return mon


def test_ema_stat_matches_closed_form():
    s = EmaStat(decay=0.5)
    for x in (1.0, 3.0):
        s.update(x)
    assert s.mean == 2.0 and s.var == pytest.approx(0.5 * (0 + 0.5 * 4.0))
    assert s.zscore(2.0 + 2 * math.sqrt(s.var), 0.0) == pytest.approx(2.0)
    assert EmaStat(0.9, mean=10.0).zscore(11.0, min_std_fraction=0.01) == pytest.approx(10.0)


@pytest.mark.parametrize(("loss", "grad", "kind"), [
    (math.nan, 1.0, NONFINITE_LOSS), (math.inf, math.nan, NONFINITE_LOSS),
    (3.0, math.nan, NONFINITE_GRAD), (3.0, math.inf, NONFINITE_GRAD),
    (30.0, 1.0, LOSS_SPIKE), (30.0, 100.0, LOSS_SPIKE), (3.0, 100.0, GRAD_SPIKE),
    (3.05, 1.02, HEALTHY), (0.5, 0.01, HEALTHY),  # downward moves are never spikes
])
def test_classification(loss, grad, kind):
    assert warmed().classify(loss, grad).kind == kind


def test_no_spike_detection_during_warmup_and_thresholds_can_be_disabled():
    mon = HealthMonitor(CFG)
    for i in range(4):
        mon.update(mon.classify(3.0, 1.0), i + 1)
    assert mon.classify(300.0, 100.0).kind == HEALTHY  # 4 < warmup_steps observations
    assert mon.classify(math.nan, 1.0).kind == NONFINITE_LOSS  # non-finite: always
    off = warmed(replace(CFG, loss_z_threshold=None, grad_z_threshold=None))
    assert off.classify(300.0, 100.0).kind == HEALTHY
    assert HealthMonitor(replace(CFG, enabled=False)).classify(math.nan, math.nan).kind == HEALTHY


def test_fp16_nonfinite_grad_is_an_overflow_not_an_incident():
    mon = HealthMonitor(CFG, fp16=True)
    v = mon.classify(3.0, math.inf)
    assert v.kind == OVERFLOW and v.skip and not v.incident
    assert mon.update(v, 1) == CONTINUE
    assert (mon.incidents, mon.skipped, mon.lr_multiplier) == (0, 1, 1.0)


def test_spikes_do_not_enter_the_statistics():
    mon = warmed()
    mean = mon.loss_stat.mean
    v = mon.classify(50.0, 1.0)
    mon.update(v, 11)
    assert mon.loss_stat.mean == mean
    assert mon.classify(50.0, 1.0).kind == LOSS_SPIKE  # the next spike is caught as well


def test_lr_backoff_compounds_then_recovers_linearly():
    mon = warmed()
    mults = []
    for step, (loss, grad) in enumerate([(math.nan, 1.0), (3.0, 1.0), (math.nan, 1.0)] +
                                        [(3.0, 1.0)] * 7, start=11):
        mon.update(mon.classify(loss, grad), step)
        mults.append(mon.lr_multiplier)
    # incident: 0.5; healthy 1 step; incident: 0.25; 2 healthy (recovery_after) hold; then
    # a linear ramp over recovery_steps=4 back to 1
    assert mults == [0.5, 0.5, 0.25, 0.25, 0.25, 0.4375, 0.625, 0.8125, 1.0, 1.0]
    mon = warmed(replace(CFG, min_lr_multiplier=0.2, rollback_after=0))
    for step in range(5):
        mon.update(mon.classify(math.nan, 1.0), 11 + step)
    assert mon.lr_multiplier == 0.2


def test_k_consecutive_incidents_roll_back_and_m_rollbacks_stop():
    mon = warmed()
    actions = [mon.update(mon.classify(math.nan, 1.0), s) for s in (11, 12, 13)]
    assert actions == [CONTINUE, CONTINUE, ROLLBACK] and mon.streak_start == 11
    mon.on_rollback()
    assert (mon.rollbacks, mon.streak) == (1, 0)
    assert mon.update(mon.classify(3.0, 1.0), 11) == CONTINUE  # a healthy step breaks a streak
    actions = [mon.update(mon.classify(3.0, math.nan), s) for s in (12, 13, 14)]
    assert actions == [CONTINUE, CONTINUE, STOP]
    diagnosis = mon.diagnosis(14)
    assert "3 consecutive unhealthy steps after 1 rollback(s)" in diagnosis
    assert "trainer.health.max_rollbacks=1" in diagnosis
    assert "6 incidents" in diagnosis and "nonfinite_grad=3, nonfinite_loss=3" in diagnosis
    err = UnhealthyRun(diagnosis)
    assert isinstance(err, SystemExit) and err.code == 3 and str(err) == diagnosis


def test_state_round_trip():
    mon = warmed()
    mon.update(mon.classify(math.nan, 1.0), 11)
    mon.attempts = 12
    other = HealthMonitor(CFG)
    other.load_state_dict(mon.state_dict())
    assert other.state_dict() == mon.state_dict()
    assert other.classify(50.0, 1.0).kind == LOSS_SPIKE and other.lr_multiplier == 0.5


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.health\.lr_backoff=1\.5"):
        HealthConfig(lr_backoff=1.5)
    with pytest.raises(ConfigError, match=r"trainer\.health\.inject\.kind='oops'"):
        InjectConfig(kind="oops")
    with pytest.raises(ConfigError, match=r"trainer\.health\.ema_decay"):
        HealthConfig(ema_decay=1.0)


def test_fault_injector_nan_hook_and_loss_scale():
    model = torch.nn.ModuleDict({"dense": torch.nn.Linear(3, 2), "experts": torch.nn.Linear(3, 2)})
    inj = FaultInjector(InjectConfig(kind="nan_grad", steps=[2]), rank=0)
    inj.attach(model)
    assert inj.param_name == "experts.weight"
    for attempt, expect_nan in ((1, False), (2, True)):
        model.zero_grad()
        inj.begin_step(attempt)
        (model["experts"](torch.ones(1, 3)).sum() + model["dense"](torch.ones(1, 3)).sum()).backward()
        assert torch.isnan(model["experts"].weight.grad).any() == expect_nan
        assert torch.isfinite(model["dense"].weight.grad).all()
    spike = FaultInjector(InjectConfig(kind="loss_spike", steps=[1], scale=100.0), rank=0)
    spike.begin_step(1)
    assert spike.scale_loss(torch.tensor(2.0)).item() == 200.0
    other_rank = FaultInjector(InjectConfig(kind="loss_spike", steps=[1]), rank=1)
    other_rank.begin_step(1)
    assert other_rank.scale_loss(torch.tensor(2.0)).item() == 2.0


def test_step_guard_on_a_plain_optimizer_skips_without_touching_state():
    """ZeRO 0 with a torch optimizer: the guard's `step` wrapper (what DeepSpeed's engine calls)
    sets `overflow` and leaves parameters and Adam state alone."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = SimpleNamespace(optimizer=opt, module=model, fp16_enabled=lambda: False)
    guard = StepGuard(engine)
    assert guard.kind == "plain" and opt.overflow is False

    def backward():
        model.zero_grad()
        model(torch.randn(8, 4)).square().sum().backward()

    backward()
    expected = math.sqrt(sum(p.grad.square().sum().item() for p in model.parameters()))
    assert guard.grad_norm() == pytest.approx(expected, rel=1e-6)
    opt.step()
    guard.after_step()
    assert opt.overflow is False
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
    backward()
    worst = guard.layer_grad_norms(top=1)
    assert worst[0][0] in ("weight", "bias") and worst[0][1] > 0
    guard.skip_next_step()
    opt.step()
    guard.after_step()
    assert opt.overflow is True
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(torch.equal(state[k][n], t) for k, v in opt.state.items() for n, t in v.items())
    opt.step()  # the next step applies again
    assert opt.overflow is False and not torch.equal(params[0], model.weight)
