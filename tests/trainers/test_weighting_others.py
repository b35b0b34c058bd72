"""Fixed, Guided Loss, DWA, DTP and uncertainty weighting against their formulas
(PAPER.md section 6) on hand-made loss sequences; state round-trips; settings checks."""

import io
import math

import pytest
import torch
from hypothesis import given, settings as hypothesis_settings, strategies as st
from pydantic import ValidationError

from trainers.errors import ConfigError
from trainers.weighting import (
    ALWA, DTP, DWA, WEIGHTINGS, FixedWeights, GuidedLoss, LossWeighting, NoneSettings, NoWeighting,
    UncertaintyWeighting, WeightingSettings, WeightOverflowError, build_weighting, hyper_parameters,
    parse_weighting, validate_weighting_config,
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
    assert list(FixedWeights().parameters()) == []


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
        assert dwa.get_extra_state()["period_calls"] == k % 2  # a period ends every 2nd call
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
            assert dwa.get_extra_state()["periods"] == epoch - 1  # calls never end a period
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

def run(method, steps, start=0, device="cpu"):
    """Deterministic calls with losses, KPIs, epoch ends and (for learnable weights)
    a plain gradient step; returns the weighted losses."""
    out = []
    for k in range(start, start + steps):
        cls = torch.tensor(1.0 + 0.5 * math.sin(k / 3.0) + 0.01 * k, dtype=torch.float64, device=device)
        reg = torch.tensor(0.5 + 0.3 * math.cos(k / 5.0), dtype=torch.float64, device=device)
        kpis = {"cls_acc": torch.tensor(0.5 + 0.4 * math.sin(k), device=device),
                "reg_iou": torch.tensor(0.3 + 0.2 * math.cos(k), device=device)}
        parameters = list(method.parameters())
        if parameters:
            cls.requires_grad_(True)
        cls_w, reg_w = method(cls, reg, kpis=kpis)
        if parameters:
            grads = torch.autograd.grad(cls_w + reg_w, parameters)
            with torch.no_grad():
                for parameter, grad in zip(parameters, grads):
                    parameter -= 0.05 * grad
        out.append((cls_w.item(), reg_w.item()))
        if k % 5 == 4:
            method.on_epoch_end(k // 5 + 1)
    return out



ROUND_TRIP_CONFIGS = [
    {"method": "none"},
    {"method": "fixed", "cls": 2.0, "reg": 0.5},
    {"method": "guided"},
    {"method": "dwa", "period": 3},
    {"method": "dwa", "period": "epoch"},
    {"method": "dtp", "gamma": 1.5, "momentum": 0.8},
    {"method": "dtp", "gamma": 1.5, "momentum": 0.8, "normalize": True},
    {"method": "uncertainty"},
    {"method": "alwa", "variant": 2, "interval": 4},
    {"method": "alwa", "variant": 1, "interval": 3, "lambda0": 0.5, "lambda0_mode": "released"},
]


def save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_state_dict_round_trip_continues_the_identical_sequence(config):
    steps, stop = 23, 13
    full = run(build_weighting(config), steps)
    first = build_weighting(config)
    head = run(first, stop)
    resumed = build_weighting(config)
    resumed.load_state_dict(save_and_load(first.state_dict()))  # strict: every key matches
    assert head + run(resumed, steps - stop, start=stop) == full
    if config["method"] != "none":
        assert len(set(full)) > 5  # the sequence is not trivially constant


def test_round_trips_cover_every_method():
    assert {c["method"] for c in ROUND_TRIP_CONFIGS} == set(WEIGHTINGS)


@pytest.mark.parametrize("method", sorted(WEIGHTINGS))
def test_to_moves_buffers_and_parameters_in_place(method):
    weighting = build_weighting({"method": method})
    parameters = list(weighting.parameters())
    state = list(weighting.buffers()) + parameters
    assert all(t.device.type == "cpu" for t in state)
    assert weighting.to("meta") is weighting
    assert all(t.device.type == "meta" for t in list(weighting.buffers()) + list(weighting.parameters()))
    expected_state = {"alwa": 3, "dwa": 3, "dtp": 1, "uncertainty": 2}.get(method, 0)
    assert len(state) == expected_state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_on_cuda_after_to_the_sequence_matches_the_cpu_one(config):
    cpu = run(build_weighting(config), 17)
    weighting = build_weighting(config)
    parameters = list(weighting.parameters())
    weighting.to("cuda")
    assert all(t.is_cuda for t in list(weighting.buffers()) + list(weighting.parameters()))
    assert [id(p) for p in weighting.parameters()] == [id(p) for p in parameters]  # the optimizer's objects
    out = run(weighting, 17, device="cuda")
    assert out == pytest.approx(cpu, rel=1e-5)
    assert all(t.is_cuda for t in weighting.state_dict().values() if torch.is_tensor(t))


SYNC_NAMES = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.mark.parametrize("method", sorted(WEIGHTINGS))
def test_no_method_syncs_with_the_host_per_call(monkeypatch, method):
    weighting = build_weighting({"method": method, **({"interval": 3} if method == "alwa" else {})})
    kpis = {"cls_acc": torch.tensor(0.9), "reg_iou": torch.tensor(0.6)}
    weighting(t(1.0), t(1.0), kpis=kpis)
    syncs = []
    for name in SYNC_NAMES:
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _name=name, _original=original, **k: syncs.append(_name) or _original(self, *a, **k))
    for k in range(12):
        weighting(t(1.0 + 0.1 * k), t(0.5 + 0.05 * (k % 3)), kpis=kpis)
        weighting.log_values()
    monkeypatch.undo()
    assert syncs == []


# ---------------------------------------------------------------- DTP normalize

def test_dtp_normalize_rescales_the_weights_to_mean_one_keeping_their_ratio():
    plain, normalized = DTP(gamma=2.0, momentum=0.5), DTP(gamma=2.0, momentum=0.5, normalize=True)
    kpis = [(0.95, 0.6), (0.99, 0.7), (0.9, 0.8)]
    k_cls, k_reg = kpis[0]
    for step, (acc, iou) in enumerate(kpis):
        if step:
            k_cls, k_reg = 0.5 * k_cls + 0.5 * acc, 0.5 * k_reg + 0.5 * iou
        w_cls, w_reg = dtp_weight(k_cls, 2.0), dtp_weight(k_reg, 2.0)
        expected = (2 * w_cls / (w_cls + w_reg), 2 * w_reg / (w_cls + w_reg))
        batch = {"cls_acc": t(acc), "reg_iou": t(iou)}
        cls_p, reg_p = plain(t(3.0, torch.float64), t(2.0, torch.float64), kpis=batch)
        cls_n, reg_n = normalized(t(3.0, torch.float64), t(2.0, torch.float64), kpis=batch)
        assert (cls_p.item(), reg_p.item()) == pytest.approx((3.0 * w_cls, 2.0 * w_reg), rel=1e-6)
        assert (cls_n.item(), reg_n.item()) == pytest.approx((3.0 * expected[0], 2.0 * expected[1]), rel=1e-6)
        logged = normalized.log_values()
        assert float(logged["cls"]) + float(logged["reg"]) == pytest.approx(2.0, rel=1e-12)
        assert float(logged["cls"]) / float(logged["reg"]) == pytest.approx(w_cls / w_reg, rel=1e-6)
    # the unnormalised RPN-like cls weight is tiny: −(1 − 0.95)²·log 0.95 at the first call
    assert dtp_weight(0.95, 2.0) == pytest.approx(1.2823e-4, rel=1e-3)


# ---------------------------------------------------------------- registry, settings

def test_registry_and_builder():
    assert set(WEIGHTINGS) == {"none", "fixed", "alwa", "guided", "dwa", "dtp", "uncertainty"}
    for name, method_class in WEIGHTINGS.items():
        assert issubclass(method_class, LossWeighting) and issubclass(method_class, torch.nn.Module)
        assert method_class.name == name == method_class.Settings().method
        assert isinstance(build_weighting({"method": name, "head": "rpn"}), method_class)
        built = build_weighting(method_class.Settings(head="roi"))
        assert type(built) is method_class and built.settings.head == "roi"
        assert type(method_class()) is method_class  # all defaults
    assert isinstance(build_weighting(None), NoWeighting)
    assert isinstance(build_weighting({}), NoWeighting)
    assert parse_weighting({"head": "rpn"}) == NoneSettings(head="rpn")
    fixed = build_weighting({"method": "fixed", "cls": 1.5, "reg": 2})
    assert (fixed.settings.cls, fixed.settings.reg) == (1.5, 2.0) and type(fixed.settings.reg) is float
    dwa = build_weighting({"method": "dwa", "temperature": 1.0, "period": 50})
    assert (dwa.settings.temperature, dwa.settings.period) == (1.0, 50)
    assert validate_weighting_config({"method": "dtp", "gamma": 0.0, "momentum": 0.0}).gamma == 0.0
    assert next(build_weighting({"method": "uncertainty"}).parameters()).requires_grad
    with pytest.raises(TypeError):
        FixedWeights(NoneSettings())  # another method's settings


def test_hyper_parameters_record_every_default():
    assert hyper_parameters(parse_weighting({"method": "alwa", "interval": 20})) == {
        "variant": 1, "lambda0": 1.0, "interval": 20, "convention": "official", "records": "weighted",
        "sync_records": False, "lambda0_mode": "paper"}
    assert hyper_parameters(parse_weighting({"method": "dtp"})) == {
        "gamma": 1.0, "momentum": 0.9, "eps": 1e-6, "normalize": False}
    assert hyper_parameters(parse_weighting({"method": "dwa"})) == {"temperature": 2.0, "period": "epoch"}
    assert hyper_parameters(parse_weighting(None)) == {}
    dumped = parse_weighting({"method": "guided", "head": "retina"}).model_dump()
    assert dumped == {"method": "guided", "head": "retina", "eps": 1e-8}
    assert parse_weighting(dumped) == parse_weighting({"method": "guided", "head": "retina"})  # round trip


@pytest.mark.parametrize("config,field,words", [
    ({"method": "alwaa"}, "weighting.method", "Allowed values: none, fixed, alwa, guided, dwa, dtp, uncertainty"),
    ({"method": ["alwa"]}, "weighting.method", "Allowed values"),
    ({"method": "alwa", "temperature": 2.0}, "weighting.temperature",
     "Allowed keys for alwa: head, method, variant, lambda0, interval, convention, records, sync_records, "
     "lambda0_mode"),
    ({"method": "none", "cls": 2.0}, "weighting.cls", "Allowed keys for none: head, method."),
    ({"method": "fixed", "cls": -1.0}, "weighting.cls", "greater than 0"),
    ({"method": "fixed", "reg": 0}, "weighting.reg", "got 0"),
    ({"method": "fixed", "reg": "1"}, "weighting.reg", "valid number"),
    ({"method": "fixed", "reg": math.inf}, "weighting.reg", "finite number"),
    ({"method": "alwa", "interval": 0}, "weighting.interval", "greater than or equal to 1"),
    ({"method": "alwa", "interval": 10**7}, "weighting.interval", "less than or equal to 1000000"),
    ({"method": "alwa", "variant": 3}, "weighting.variant", "1 or 2"),
    ({"method": "alwa", "convention": "offical"}, "weighting.convention", "'official' or 'paper'"),
    ({"method": "alwa", "lambda0_mode": "code"}, "weighting.lambda0_mode", "'paper' or 'released'"),
    ({"method": "dwa", "period": 0}, "weighting.period", "'epoch'"),
    ({"method": "dwa", "period": "epochs"}, "weighting.period", "'epoch'"),
    ({"method": "dwa", "temperature": 0.0}, "weighting.temperature", "greater than 0"),
    ({"method": "dtp", "momentum": 1.0}, "weighting.momentum", "less than 1"),
    ({"method": "dtp", "gamma": -0.5}, "weighting.gamma", "greater than or equal to 0"),
    ({"method": "dtp", "eps": 0.5}, "weighting.eps", "less than 0.5"),
    ({"method": "dtp", "normalize": "yes"}, "weighting.normalize", "valid boolean"),
    ({"method": "uncertainty", "init": 0.0}, "weighting.init", "Allowed keys for uncertainty: head, method."),
    ({"method": "alwa", "head": "rpm"}, "weighting.head", "'auto', 'rpn', 'roi' or 'retina'"),
    (["alwa"], "weighting", "mapping"),
])
def test_config_errors_name_the_field_and_the_allowed_values(config, field, words):
    with pytest.raises(ConfigError) as error:
        validate_weighting_config(config)
    assert error.value.where == field
    assert words in str(error.value)
    with pytest.raises(ValidationError):
        build_weighting(config)


# Each numeric field's documented range, written here from the issue (not read from
# the models): (low, low inclusive, high, high inclusive, integer).
RANGES = {
    ("fixed", "cls"): (0, False, math.inf, False, False),
    ("fixed", "reg"): (0, False, math.inf, False, False),
    ("alwa", "lambda0"): (0, False, math.inf, False, False),
    ("alwa", "interval"): (1, True, 1_000_000, True, True),
    ("guided", "eps"): (0, False, 1, False, False),
    ("dwa", "temperature"): (0, False, math.inf, False, False),
    ("dwa", "period"): (1, True, math.inf, False, True),  # or "epoch"
    ("dtp", "gamma"): (0, True, math.inf, False, False),
    ("dtp", "momentum"): (0, True, 1, False, False),
    ("dtp", "eps"): (0, False, 0.5, False, False),
}
CHOICES = {
    ("alwa", "variant"): (1, 2),
    ("alwa", "convention"): ("official", "paper"),
    ("alwa", "records"): ("weighted", "raw"),
    ("alwa", "lambda0_mode"): ("paper", "released"),
    ("alwa", "sync_records"): (False, True),
    ("dtp", "normalize"): (False, True),
    **{(method, "head"): ("auto", "rpn", "roi", "retina") for method in
       ("none", "fixed", "alwa", "guided", "dwa", "dtp", "uncertainty")},
}


def out_of_range(low, low_in, high, high_in, integer):
    below = (st.integers(max_value=low - (1 if low_in else 0)) if integer
             else st.floats(max_value=low, exclude_max=low_in, allow_nan=False, allow_infinity=False))
    strategies = [below]
    if math.isfinite(high):
        strategies.append(st.integers(min_value=high + (1 if high_in else 0)) if integer
                          else st.floats(min_value=high, exclude_min=high_in, allow_nan=False,
                                         allow_infinity=False))
    return st.one_of(*strategies)


WRONG_TYPES = st.one_of(st.none(), st.text(max_size=5), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))


def bad_values(key):
    if key in RANGES:
        low, low_in, high, high_in, integer = RANGES[key]
        non_finite = st.sampled_from([math.nan, math.inf, -math.inf])
        wrong = st.one_of(WRONG_TYPES.filter(lambda v: v != "epoch"), st.booleans(),
                          st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v))
                          if integer else st.nothing())
        return st.one_of(out_of_range(*RANGES[key]), non_finite, wrong)
    allowed = CHOICES[key]
    others = st.one_of(WRONG_TYPES, st.integers(), st.floats(allow_nan=True), st.booleans())
    # exact types: True is not variant 1, 1.0 is not 1, 1 is not true
    return others.filter(lambda v: not any(type(v) is type(a) and v == a for a in allowed))


@hypothesis_settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(RANGES) + sorted(CHOICES)).flatmap(
    lambda key: bad_values(key).map(lambda value: (key, value))))
def test_any_bad_value_raises_a_validation_error_naming_the_field(case):
    (method, field), value = case
    with pytest.raises(ValidationError) as error:
        parse_weighting({"method": method, field: value})
    assert {e["loc"][:2] for e in error.value.errors()} == {(method, field)}
    with pytest.raises(ValidationError) as error:
        WEIGHTINGS[method](**{field: value})
    assert {e["loc"][0] for e in error.value.errors()} == {field}
    with pytest.raises(ConfigError) as config_error:
        validate_weighting_config({"method": method, field: value})
    assert config_error.value.where == f"weighting.{field}"


def in_range(low, low_in, high, high_in, integer):
    if integer:
        return st.integers(min_value=low if low_in else low + 1,
                           max_value=min(high if high_in else high - 1, 10**9) if math.isfinite(high) else 10**9)
    return st.floats(min_value=low, max_value=high if math.isfinite(high) else 1e300,
                     exclude_min=not low_in, exclude_max=not high_in and math.isfinite(high))


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(RANGES) + sorted(CHOICES)).flatmap(
    lambda key: (in_range(*RANGES[key]) if key in RANGES else st.sampled_from(CHOICES[key])).map(
        lambda value: (key, value))))
def test_any_good_value_is_kept_exactly_and_frozen(case):
    (method, field), value = case
    settings = parse_weighting({"method": method, field: value})
    assert getattr(settings, field) == value and isinstance(settings, WeightingSettings)
    assert parse_weighting(settings.model_dump()) == settings
    with pytest.raises(ValidationError):
        setattr(settings, field, value)  # frozen: a run's settings cannot drift


def test_alwa_is_exported_with_the_documented_signature():
    alwa = ALWA(variant=1, lambda0=1.0, interval=100, convention="official")
    assert float(alwa.alpha) == 1.0 and list(alwa.parameters()) == [] and alwa.log_values() == {}
    assert not hasattr(alwa, "updated")
