"""Fixed, Guided Loss, DWA, DTP and uncertainty weighting against their formulas
(PAPER.md section 6) on hand-made loss sequences; state round-trips; config checks."""

import io
import math

import pytest
import torch

from trainers.errors import ConfigError
from trainers.weighting import (
    ALWA, DTP, DWA, WEIGHTINGS, FixedWeights, GuidedLoss, LossWeighting, NoWeighting, UncertaintyWeighting,
    WeightOverflowError, build_weighting, validate_weighting_config,
)


def t(value, dtype=torch.float32, requires_grad=False):
    return torch.tensor(value, dtype=dtype, requires_grad=requires_grad)


def weighted(method, cls, reg, **kwargs):
    cls_w, reg_w = method(t(cls, torch.float64), t(reg, torch.float64), **kwargs)
    return cls_w.item(), reg_w.item()


# ---------------------------------------------------------------- fixed / none

def test_fixed_weights_multiply_and_log():
    fixed = FixedWeights(cls=2.0, reg=0.5)
    assert weighted(fixed, 3.0, 4.0) == (6.0, 2.0)
    assert fixed.log_values() == {"cls": 2.0, "reg": 0.5}
    assert weighted(NoWeighting(), 3.0, 4.0) == (3.0, 4.0)
    assert FixedWeights().parameters() == []


# ---------------------------------------------------------------- guided loss

def test_guided_loss_scales_cls_by_the_detached_ratio():
    guided = GuidedLoss()
    cls_loss, reg_loss = t(4.0, requires_grad=True), t(1.0, requires_grad=True)
    cls_w, reg_w = guided(cls_loss, reg_loss)
    assert cls_w.item() == pytest.approx(1.0)  # (1/4)·4
    assert reg_w.item() == 1.0
    d_cls, d_reg = torch.autograd.grad(cls_w + reg_w, [cls_loss, reg_loss])
    assert d_cls.item() == pytest.approx(0.25)  # the ratio is a constant for autograd
    assert d_reg.item() == 1.0  # only through reg_w: no gradient through the ratio
    assert guided.log_values()["cls"].item() == pytest.approx(0.25)
    assert guided.log_values()["reg"] == 1.0
    for cls, reg in [(0.8, 1.2), (2.5, 0.1)]:
        assert weighted(guided, cls, reg) == pytest.approx((reg, reg))  # equal magnitudes


def test_guided_loss_eps_guards_a_vanishing_cls_loss():
    guided = GuidedLoss(eps=1e-6)
    cls_w, _ = guided(t(0.0), t(0.5))
    assert math.isfinite(cls_w.item()) and cls_w.item() == 0.0
    assert guided.log_values()["cls"].item() == pytest.approx(0.5 / 1e-6)


# ---------------------------------------------------------------- DWA

def dwa_weights(r_cls, r_reg, temperature):
    """MTAN's Eq.: w_k = K·exp(r_k/T) / Σ_j exp(r_j/T), K = 2."""
    e_cls, e_reg = math.exp(r_cls / temperature), math.exp(r_reg / temperature)
    return 2 * e_cls / (e_cls + e_reg), 2 * e_reg / (e_cls + e_reg)


def test_dwa_iteration_periods_follow_the_formula():
    dwa = DWA(temperature=2.0, period=2)
    # periods of 2 calls: averages cls 3, 1.5, 3 ; reg 1, 1, 2
    calls = [(2.0, 1.0), (4.0, 1.0), (1.0, 0.5), (2.0, 1.5), (3.0, 2.0), (3.0, 2.0), (5.0, 7.0)]
    w3 = dwa_weights(1.5 / 3.0, 1.0 / 1.0, 2.0)  # ≈ (0.8756, 1.1244)
    w4 = dwa_weights(3.0 / 1.5, 2.0 / 1.0, 2.0)  # equal ratios: (1, 1)
    expected_weights = [(1, 1), (1, 1), (1, 1), (1, 1), w3, w3, w4]
    for k, ((cls, reg), (w_cls, w_reg)) in enumerate(zip(calls, expected_weights), start=1):
        assert weighted(dwa, cls, reg) == pytest.approx((w_cls * cls, w_reg * reg), rel=1e-12), k
        assert dwa.updated() == (k % 2 == 0)
        logged = dwa.log_values()
        assert (float(logged["cls"]), float(logged["reg"])) == pytest.approx((w_cls, w_reg), rel=1e-12)
    assert w3[0] == pytest.approx(0.8756, abs=1e-4) and w4 == pytest.approx((1.0, 1.0))


def test_dwa_epoch_periods_use_on_epoch_end():
    dwa = DWA(temperature=2.0)  # period "epoch"
    epochs = [[(2.0, 1.0), (2.0, 1.0), (2.0, 1.0)], [(1.0, 1.0), (1.0, 1.0)], [(1.0, 1.0)]]
    expected = [(1.0, 1.0), (1.0, 1.0), dwa_weights(0.5, 1.0, 2.0)]
    for epoch, (losses, (w_cls, w_reg)) in enumerate(zip(epochs, expected), start=1):
        for cls, reg in losses:
            assert weighted(dwa, cls, reg) == pytest.approx((w_cls * cls, w_reg * reg), rel=1e-12)
            assert not dwa.updated()
        dwa.on_epoch_end(epoch)


def test_dwa_overflow_raises_weight_overflow_error():
    # r_cls = 2, T = 0.01: exp(200) overflows float32 (max ≈ exp(88.7)) -> inf / inf.
    dwa = DWA(temperature=0.01, period=1)
    dwa(t(1.0), t(1.0))
    with pytest.raises(WeightOverflowError, match="not finite"):
        dwa(t(2.0), t(1.0))
    assert issubclass(WeightOverflowError, ArithmeticError)
    # in float64 exp(200) is finite, exp(2000) is not
    dwa64 = DWA(temperature=0.01, period=1)
    weighted(dwa64, 1.0, 1.0)
    weighted(dwa64, 2.0, 1.0)
    assert weighted(dwa64, 1.0, 1.0) == pytest.approx(dwa_weights(2.0, 1.0, 0.01), rel=1e-12)
    dwa64 = DWA(temperature=0.001, period=1)
    weighted(dwa64, 1.0, 1.0)
    with pytest.raises(WeightOverflowError):
        weighted(dwa64, 2.0, 1.0)


def test_dwa_syncs_once_per_period_and_never_per_call(monkeypatch):
    losses = [(t(1.0 + 0.1 * k), t(1.0)) for k in range(12)]
    dwa = DWA(period=4)
    dwa(*losses[0])
    syncs = []
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _name=name, _original=original, **k: syncs.append(_name) or _original(self, *a, **k))
    per_call = []
    for cls, reg in losses[1:]:
        before = len(syncs)
        dwa(cls, reg)
        dwa.log_values()
        per_call.append(len(syncs) - before)
    monkeypatch.undo()
    # calls 2..12; periods end at calls 4, 8, 12; weights (and the check) from the second
    assert per_call == [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]


# ---------------------------------------------------------------- DTP

def dtp_weight(kappa, gamma):
    return -((1 - kappa) ** gamma) * math.log(kappa)


def test_dtp_weights_follow_the_ema_of_the_kpis():
    dtp = DTP(gamma=2.0, momentum=0.75)
    kpis = [(0.8, 0.5), (0.6, 0.7), (0.9, 0.9)]
    # κ̄ by hand: starts at the first KPI, then 0.75·κ̄ + 0.25·κ
    averages = [(0.8, 0.5), (0.75, 0.55), (0.7875, 0.6375)]
    for (acc, iou), (k_cls, k_reg) in zip(kpis, averages):
        cls_w, reg_w = dtp(t(2.0, torch.float64), t(3.0, torch.float64),
                           kpis={"cls_acc": t(acc), "reg_iou": t(iou)})
        w_cls, w_reg = dtp_weight(k_cls, 2.0), dtp_weight(k_reg, 2.0)
        assert (cls_w.item(), reg_w.item()) == pytest.approx((2.0 * w_cls, 3.0 * w_reg), rel=1e-6)
        assert float(dtp.log_values()["cls"]) == pytest.approx(w_cls, rel=1e-6)
    # first call: −0.2²·log 0.8 and −0.5²·log 0.5
    assert dtp_weight(0.8, 2.0) == pytest.approx(0.0089257, rel=1e-4)
    assert dtp_weight(0.5, 2.0) == pytest.approx(0.1732868, rel=1e-6)


def test_dtp_clamps_the_kpis_and_keeps_the_gradient_path():
    dtp = DTP(gamma=1.0, momentum=0.0, eps=1e-3)
    cls_loss = t(2.0, requires_grad=True)
    cls_w, reg_w = dtp(cls_loss, t(1.0), kpis={"cls_acc": t(0.0), "reg_iou": t(1.0)})
    assert cls_w.item() == pytest.approx(2.0 * dtp_weight(1e-3, 1.0), rel=1e-5)
    assert reg_w.item() == pytest.approx(dtp_weight(1 - 1e-3, 1.0), rel=1e-3)
    d_cls, = torch.autograd.grad(cls_w, cls_loss)
    assert d_cls.item() == pytest.approx(dtp_weight(1e-3, 1.0), rel=1e-5)


def test_dtp_without_kpis_is_a_clear_error():
    with pytest.raises(ConfigError, match="cls_acc, reg_iou"):
        DTP()(t(1.0), t(1.0))
    with pytest.raises(ConfigError, match="did not report reg_iou"):
        DTP()(t(1.0), t(1.0), kpis={"cls_acc": t(0.5)})


# ---------------------------------------------------------------- uncertainty

def test_uncertainty_weighting_formula_gradients_and_parameters():
    uw = UncertaintyWeighting()
    assert weighted(uw, 2.0, 3.0) == (2.0, 3.0)  # s = 0: weights 1, offsets 0
    uw.load_state_dict({"log_var_cls": torch.tensor(0.5), "log_var_reg": torch.tensor(-0.3)})
    cls_loss, reg_loss = t(2.0, requires_grad=True), t(3.0, requires_grad=True)
    cls_w, reg_w = uw(cls_loss, reg_loss)
    assert cls_w.item() == pytest.approx(math.exp(-0.5) * 2.0 + 0.5, rel=1e-6)
    assert reg_w.item() == pytest.approx(math.exp(0.3) * 3.0 - 0.3, rel=1e-6)
    assert float(uw.log_values()["cls"]) == pytest.approx(math.exp(-0.5), rel=1e-6)
    d_cls, d_s_cls, d_s_reg = torch.autograd.grad(cls_w + reg_w, [cls_loss, *uw.parameters()])
    assert d_cls.item() == pytest.approx(math.exp(-0.5), rel=1e-6)
    assert d_s_cls.item() == pytest.approx(1 - math.exp(-0.5) * 2.0, rel=1e-6)  # d/ds (e^{-s}L + s)
    assert d_s_reg.item() == pytest.approx(1 - math.exp(0.3) * 3.0, rel=1e-6)

    optimizer = torch.optim.SGD(uw.parameters(), lr=0.1)
    cls_w, reg_w = uw(t(2.0), t(3.0))
    (cls_w + reg_w).backward()
    optimizer.step()
    assert uw.log_var_cls.item() == pytest.approx(0.5 - 0.1 * (1 - math.exp(-0.5) * 2.0), rel=1e-6)


# ---------------------------------------------------------------- state round-trips

def run(method, steps, start=0):
    """Deterministic calls with losses, KPIs, epoch ends and (for learnable weights)
    a plain gradient step; returns the weighted losses."""
    out = []
    for k in range(start, start + steps):
        cls = torch.tensor(1.0 + 0.5 * math.sin(k / 3.0) + 0.01 * k, dtype=torch.float64)
        reg = torch.tensor(0.5 + 0.3 * math.cos(k / 5.0), dtype=torch.float64)
        kpis = {"cls_acc": torch.tensor(0.5 + 0.4 * math.sin(k)), "reg_iou": torch.tensor(0.3 + 0.2 * math.cos(k))}
        if method.parameters():
            cls.requires_grad_(True)
        cls_w, reg_w = method(cls, reg, kpis=kpis)
        if method.parameters():
            grads = torch.autograd.grad(cls_w + reg_w, method.parameters())
            with torch.no_grad():
                for parameter, grad in zip(method.parameters(), grads):
                    parameter -= 0.05 * grad
        out.append((cls_w.item(), reg_w.item()))
        if k % 5 == 4:
            method.on_epoch_end(k // 5 + 1)
    return out


@pytest.mark.parametrize("config", [
    {"method": "fixed", "cls": 2.0, "reg": 0.5},
    {"method": "guided"},
    {"method": "dwa", "period": 3},
    {"method": "dwa", "period": "epoch"},
    {"method": "dtp", "gamma": 1.5, "momentum": 0.8},
    {"method": "uncertainty"},
    {"method": "alwa", "variant": 2, "interval": 4},
], ids=lambda c: f"{c['method']}-{c.get('period', '')}")
def test_state_dict_round_trip_continues_the_identical_sequence(config):
    steps, stop = 23, 13
    full = run(build_weighting(config), steps)
    first = build_weighting(config)
    head = run(first, stop)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_weighting(config)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert head + run(resumed, steps - stop, start=stop) == full
    assert len(set(full)) > 5  # the sequence is not trivially constant


# ---------------------------------------------------------------- config

def test_registry_and_builder():
    assert set(WEIGHTINGS) == {"none", "fixed", "alwa", "guided", "dwa", "dtp", "uncertainty"}
    for name, method_class in WEIGHTINGS.items():
        assert issubclass(method_class, LossWeighting) and method_class.name == name
        assert isinstance(build_weighting({"method": name, "head": "rpn"}), method_class)
    assert isinstance(build_weighting(None), NoWeighting)
    assert isinstance(build_weighting({}), NoWeighting)
    fixed = build_weighting({"method": "fixed", "cls": 1.5, "reg": 2})
    assert (fixed.cls, fixed.reg) == (1.5, 2.0)
    dwa = build_weighting({"method": "dwa", "temperature": 1.0, "period": 50})
    assert (dwa.temperature, dwa.period) == (1.0, 50)
    assert validate_weighting_config({"method": "dtp", "gamma": 0.0, "momentum": 0.0}) is None
    assert build_weighting({"method": "uncertainty"}).parameters()[0].requires_grad


@pytest.mark.parametrize("config,field,words", [
    ({"method": "alwaa"}, "weighting.method", "Allowed values: alwa, dtp, dwa, fixed, guided, none, uncertainty"),
    ({"method": ["alwa"]}, "weighting.method", "Allowed values"),
    ({"method": "alwa", "temperature": 2.0}, "weighting.temperature",
     "Allowed keys for alwa: method, head, variant, lambda0, interval, convention, records, sync_records"),
    ({"method": "none", "cls": 2.0}, "weighting.cls", "Allowed keys for none: method, head."),
    ({"method": "fixed", "cls": -1.0}, "weighting.cls", "> 0"),
    ({"method": "fixed", "reg": 0}, "weighting.reg", "got 0"),
    ({"method": "fixed", "reg": "1"}, "weighting.reg", "finite number"),
    ({"method": "alwa", "interval": 0}, "weighting.interval", "integer >= 1"),
    ({"method": "alwa", "variant": 3}, "weighting.variant", "Allowed values: 1, 2"),
    ({"method": "alwa", "convention": "offical"}, "weighting.convention", "Allowed values: official, paper"),
    ({"method": "dwa", "period": 0}, "weighting.period", "'epoch'"),
    ({"method": "dwa", "period": "epochs"}, "weighting.period", "'epoch'"),
    ({"method": "dwa", "temperature": 0.0}, "weighting.temperature", "finite number"),
    ({"method": "dtp", "momentum": 1.0}, "weighting.momentum", "[0, 1)"),
    ({"method": "dtp", "gamma": -0.5}, "weighting.gamma", ">= 0"),
    ({"method": "dtp", "eps": 0.5}, "weighting.eps", "(0, 0.5)"),
    ({"method": "uncertainty", "init": 0.0}, "weighting.init", "Allowed keys for uncertainty: method, head."),
    ({"method": "alwa", "head": "rpm"}, "weighting.head", "Allowed values: auto, retina, roi, rpn"),
    (["alwa"], "weighting", "mapping"),
])
def test_config_errors_name_the_field_and_the_allowed_values(config, field, words):
    for check in (build_weighting, validate_weighting_config):
        with pytest.raises(ConfigError) as error:
            check(config)
        assert error.value.where == field
        assert words in str(error.value)


def test_alwa_is_exported_with_the_documented_signature():
    alwa = ALWA(variant=1, lambda0=1.0, interval=100, convention="official")
    assert alwa.alpha == 1.0 and alwa.parameters() == [] and not alwa.updated()
