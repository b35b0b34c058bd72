"""ALWA against a deliberately naive re-implementation of PAPER.md sections 2-3.

The reference below uses Python floats, lists and the ``statistics`` module, and is
written from the paper's description, not from trainers/weighting/alwa.py.
"""

import io
import math
import random
import statistics

import pytest
import torch

from pydantic import ValidationError

from trainers.errors import ConfigError
from trainers.weighting import ALWA, ALWASettings, build_weighting, validate_weighting_config


class NaiveALWA:
    def __init__(self, variant, lambda0, interval, convention, records, lambda0_mode="paper"):
        self.variant, self.lambda0, self.interval = variant, lambda0, interval
        self.convention, self.records, self.lambda0_mode = convention, records, lambda0_mode
        self.alpha = 1.0
        self.released_weight = lambda0  # the released head's cls_weight: λ0, then α once replaced
        self.k = 0
        self.s_cls, self.s_reg = [], []
        self.updates = []  # (k, cls score, reg score) of every update
        self.windows = []  # (cls mean, cls std, reg mean, reg std) of every update

    def spread(self, values):
        if len(values) == 1:
            return 0.0  # documented choice: the std of a single record is 0
        if self.convention == "official":
            return statistics.stdev(values)  # sample std (ddof = 1), as released
        return statistics.pstdev(values)  # population std (ddof = 0), Algorithm 1

    def score(self, values):
        if self.variant == 1:
            return statistics.fmean(values) + self.spread(values)
        return self.spread(values)

    def step(self, cls, reg):
        self.k += 1
        cls_weight = self.alpha * self.lambda0 if self.lambda0_mode == "paper" else self.released_weight
        cls_weighted = cls_weight * cls
        reg_weighted = self.lambda0 * reg
        if self.records == "weighted":
            self.s_cls.append(cls_weighted)
            self.s_reg.append(reg_weighted)
        else:
            self.s_cls.append(cls)
            self.s_reg.append(reg)
        i = self.k if self.convention == "official" else self.k - 1
        updated = i % self.interval == 0
        if updated:
            cls_score, reg_score = self.score(self.s_cls), self.score(self.s_reg)
            self.windows.append((statistics.fmean(self.s_cls), self.spread(self.s_cls),
                                 statistics.fmean(self.s_reg), self.spread(self.s_reg)))
            self.s_cls, self.s_reg = [], []
            self.updates.append((self.k, cls_score, reg_score))
            if cls_score > reg_score:
                self.alpha = reg_score / cls_score
                self.released_weight = self.alpha
        return cls_weighted, reg_weighted, updated


def loss_sequence(seed, n):
    """Losses with trends, oscillations and noise of varying amplitude, so that the
    classification loss dominates (in level and in spread) at some times and not at
    others, and the weighted records keep crossing the regression ones."""
    rng = random.Random(seed)
    out = []
    for k in range(n):
        cls_level = 1.2 * math.exp(-k / 500.0) + 0.5 + 0.35 * math.sin(k / 37.0)
        cls_spread = 0.05 + 0.45 * (1 + math.sin(k / 23.0 + 2.0)) / 2
        reg_level = 0.6 + 0.25 * math.sin(k / 61.0 + 1.0)
        reg_spread = 0.05 + 0.25 * (1 + math.cos(k / 29.0)) / 2
        out.append((cls_level + cls_spread * rng.random(), reg_level + reg_spread * rng.random()))
    return out


WINDOW_KEYS = ("window/cls_mean", "window/cls_std", "window/reg_mean", "window/reg_std")


def updated(alwa):
    """Whether the last call updated α: only updating calls log the window statistics."""
    return WINDOW_KEYS[0] in alwa.log_values()


def run_alwa(alwa, losses, windows=None):
    """Per call: (cls_w, reg_w, updated, α for the next call); the logged window
    statistics of the updating calls are appended to ``windows``."""
    rows = []
    for cls, reg in losses:
        cls_w, reg_w = alwa(torch.tensor(cls, dtype=torch.float64), torch.tensor(reg, dtype=torch.float64))
        rows.append((float(cls_w), float(reg_w), updated(alwa), float(alwa.alpha)))
        if windows is not None and updated(alwa):
            logged = alwa.log_values()
            windows.append(tuple(float(logged[key]) for key in WINDOW_KEYS))
    return rows


CASES = [
    (variant, convention, records, interval, "paper")
    for variant in (1, 2)
    for convention in ("official", "paper")
    for records in ("weighted", "raw")
    for interval in (1, 3, 7, 100)
] + [(variant, "official", records, interval, "released")
     for variant in (1, 2) for records in ("weighted", "raw") for interval in (3, 100)]


@pytest.mark.parametrize("variant,convention,records,interval,lambda0_mode", CASES)
def test_alpha_sequence_matches_naive_reference_and_resumes_identically(variant, convention, records, interval,
                                                                        lambda0_mode):
    n_calls = 1200
    seed = CASES.index((variant, convention, records, interval, lambda0_mode))
    losses = loss_sequence(seed, n_calls)
    lambda0 = 0.75 if variant == 2 or lambda0_mode == "released" else 1.0
    config = dict(variant=variant, lambda0=lambda0, interval=interval, convention=convention, records=records,
                  lambda0_mode=lambda0_mode)

    reference = NaiveALWA(**config)
    expected = []
    for cls, reg in losses:
        cls_w, reg_w, updated = reference.step(cls, reg)
        expected.append((cls_w, reg_w, updated, reference.alpha))

    # The data exercise both branches: some updates replace α, some keep it.
    changed = sum(c > r for _, c, r in reference.updates)
    kept = len(reference.updates) - changed
    if not (variant == 2 and interval == 1):  # one record per window: both stds are 0
        assert changed > 0, (changed, kept)
    if len(reference.updates) >= 50:
        assert kept > 0, (changed, kept)

    windows = []
    got = run_alwa(ALWA(**config), losses, windows)
    for k, (row, ref) in enumerate(zip(got, expected), start=1):
        assert row[2] == ref[2], f"call {k}: updated {row[2]} != {ref[2]}"
        assert row[0] == pytest.approx(ref[0], rel=1e-10), f"call {k}: cls_w"
        assert row[1] == pytest.approx(ref[1], rel=1e-12), f"call {k}: reg_w"
        assert row[3] == pytest.approx(ref[3], rel=1e-10), f"call {k}: alpha"
    # The window statistics too (they tell the two conventions' ddof apart even in
    # ALWA_2, whose α is invariant to a common rescaling of both stds).
    assert len(windows) == len(reference.windows)
    for got_window, ref_window in zip(windows, reference.windows):
        assert got_window == pytest.approx(ref_window, rel=1e-9, abs=1e-12)

    # Resume mid-window through a weights_only checkpoint: identical continuation.
    stop = random.Random(seed + 1).randrange(1, n_calls - 1)
    if interval > 2:
        while ALWA(**config)._update_due(stop):  # make sure the save falls inside a window
            stop += 1
    first = ALWA(**config)
    head = run_alwa(first, losses[:stop])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ALWA(**config)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert float(resumed.alpha) == float(first.alpha)
    tail = run_alwa(resumed, losses[stop:])
    assert head + tail == got  # exact: same arithmetic, same records


def test_weighted_values_gradients_and_alpha_is_the_next_calls_alpha():
    alwa = ALWA(variant=2, lambda0=0.5, interval=4)
    rng = random.Random(3)
    next_alpha = float(alwa.alpha)
    assert next_alpha == 1.0
    seen_alpha_below_one = False
    for k in range(1, 41):
        x = torch.tensor([rng.uniform(1, 3), rng.uniform(0, 2)], dtype=torch.float64, requires_grad=True)
        cls_loss = (x[0] ** 2).reshape(())  # the loss comes out of a graph, like a detector's
        reg_loss = x[1] * 0.3
        cls_w, reg_w = alwa(cls_loss, reg_loss)
        assert cls_w.item() == pytest.approx(next_alpha * 0.5 * cls_loss.item(), rel=1e-12)
        assert reg_w.item() == pytest.approx(0.5 * reg_loss.item(), rel=1e-12)
        d_cls, = torch.autograd.grad(cls_w, cls_loss, retain_graph=True)
        d_reg, = torch.autograd.grad(reg_w, reg_loss, retain_graph=True)
        assert d_cls.item() == pytest.approx(next_alpha * 0.5, rel=1e-12)
        assert d_reg.item() == pytest.approx(0.5, rel=1e-12)
        # and through to the network: d cls_w / d x0 = α·λ0·2·x0
        grad_x, = torch.autograd.grad(cls_w, x)
        assert grad_x[0].item() == pytest.approx(next_alpha * 0.5 * 2 * x[0].item(), rel=1e-12)
        logged = alwa.log_values()
        assert float(logged["alpha"]) == next_alpha
        assert float(logged["cls"]) == pytest.approx(next_alpha * 0.5, rel=1e-12)
        assert logged["reg"] == 0.5
        seen_alpha_below_one |= next_alpha < 1
        next_alpha = float(alwa.alpha)
    assert seen_alpha_below_one


def test_log_values_keys_on_update_and_non_update_calls():
    alwa = ALWA(variant=1, interval=5)
    window = []
    for k in range(1, 16):
        cls, reg = 1.0 + 0.1 * k, 0.5 + 0.05 * (k % 3)
        alwa(torch.tensor(cls), torch.tensor(reg))
        window.append((float(alwa.log_values()["cls"]) * cls, reg))
        keys = set(alwa.log_values())
        if k % 5 == 0:
            assert keys == {"cls", "reg", "alpha", "window/cls_mean", "window/cls_std",
                            "window/reg_mean", "window/reg_std"}
            values = alwa.log_values()
            cls_records = [c for c, _ in window]
            reg_records = [r for _, r in window]
            assert float(values["window/cls_mean"]) == pytest.approx(statistics.fmean(cls_records), rel=1e-6)
            assert float(values["window/cls_std"]) == pytest.approx(statistics.stdev(cls_records), rel=1e-5)
            assert float(values["window/reg_mean"]) == pytest.approx(statistics.fmean(reg_records), rel=1e-6)
            assert float(values["window/reg_std"]) == pytest.approx(statistics.stdev(reg_records), rel=1e-5)
            window = []
        else:
            assert keys == {"cls", "reg", "alpha"}
    assert ALWA().log_values() == {}


def test_logged_tensors_are_not_overwritten_by_later_calls():
    alwa = ALWA(interval=2)
    alwa(torch.tensor(3.0), torch.tensor(1.0))
    first = alwa.log_values()
    for _ in range(5):
        alwa(torch.tensor(5.0), torch.tensor(1.0))
    assert float(first["alpha"]) == 1.0 and float(first["cls"]) == 1.0


def test_float32_losses_keep_their_dtype():
    alwa = ALWA(interval=2)
    for _ in range(4):
        cls_w, reg_w = alwa(torch.tensor(2.0), torch.tensor(0.5))
        assert cls_w.dtype == torch.float32 and reg_w.dtype == torch.float32
    # windows of identical values: mean+std = 2·α_prev vs 0.5 (ddof=1 std is 0)
    assert float(alwa.alpha) == pytest.approx(0.25)


class SyncCounter:
    """Patches every Tensor method that copies a value to the host; counts the calls."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.calls = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return wrapper


@pytest.mark.parametrize("convention", ["official", "paper"])
@pytest.mark.parametrize("sync_records", [False, True])
def test_no_host_sync_per_call_nor_per_update(monkeypatch, convention, sync_records):
    losses = [(torch.tensor(2.0 + (k % 5) * 0.3), torch.tensor(1.0 + (k % 3) * 0.1)) for k in range(60)]
    alwa = ALWA(variant=1, interval=7, convention=convention, sync_records=sync_records)
    alwa(*losses[0])  # first call moves the state to the loss's device: outside the count
    counter = SyncCounter(monkeypatch)
    updates = 0
    for cls, reg in losses[1:]:
        alwa(cls, reg)
        alwa.log_values()
        updates += updated(alwa)
    monkeypatch.undo()
    assert updates >= 7
    assert counter.calls == []
    assert float(alwa.alpha) < 1.0  # the updates did happen on the device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_sync_under_sync_debug_mode():
    device = torch.device("cuda")
    losses = [(torch.rand((), device=device) + 1, torch.rand((), device=device)) for _ in range(50)]
    alwa = ALWA(variant=2, interval=5)
    alwa(*losses[0])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for cls, reg in losses[1:]:
            alwa(cls, reg)
            alwa.log_values()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert 0 < float(alwa.alpha) <= 1


def test_state_dict_rejects_a_different_configuration():
    alwa = ALWA(interval=10)
    alwa(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match="interval"):
        ALWA(interval=20).load_state_dict(alwa.state_dict())


def test_state_dict_round_trip_right_after_an_update():
    losses = loss_sequence(11, 50)
    full = run_alwa(ALWA(variant=2, interval=5), losses)
    first = ALWA(variant=2, interval=5)
    head = run_alwa(first, losses[:20])  # call 20 updated: empty window saved
    assert first.state_dict()["_extra_state"]["count"] == 0
    resumed = ALWA(variant=2, interval=5)
    resumed.load_state_dict(first.state_dict())
    assert head + run_alwa(resumed, losses[20:]) == full


def _distributed_worker(rank, world_size, init_file, result_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        losses = loss_sequence(100 + rank, 40)  # each rank sees different losses
        alwa = ALWA(variant=1, interval=4, sync_records=True)
        windows = []
        alphas = [row[3] for row in run_alwa(alwa, losses, windows)]
        torch.save({"alphas": alphas, "windows": windows}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_sync_records_averages_the_records_across_ranks(tmp_path):
    world_size = 2
    result_file = tmp_path / "alphas"
    torch.multiprocessing.spawn(_distributed_worker, args=(world_size, str(tmp_path / "init"), str(result_file)),
                                nprocs=world_size, join=True)
    results = [torch.load(f"{result_file}.{r}", weights_only=True) for r in range(world_size)]
    alphas = [result["alphas"] for result in results]
    assert alphas[0] == alphas[1]  # every rank derives the same α
    assert results[0]["windows"] == results[1]["windows"]

    # Reference: the records of both ranks averaged element-wise, then Algorithm 1
    # with the released conventions (mean + sample std over each window of 4).
    per_rank = [loss_sequence(100 + r, 40) for r in range(world_size)]
    alpha, window_cls, window_reg, expected, expected_windows = 1.0, [], [], [], []
    for k in range(1, 41):
        window_cls.append(statistics.fmean(alpha * seq[k - 1][0] for seq in per_rank))
        window_reg.append(statistics.fmean(seq[k - 1][1] for seq in per_rank))
        if k % 4 == 0:
            cls_score = statistics.fmean(window_cls) + statistics.stdev(window_cls)
            reg_score = statistics.fmean(window_reg) + statistics.stdev(window_reg)
            expected_windows.append((statistics.fmean(window_cls), statistics.stdev(window_cls),
                                     statistics.fmean(window_reg), statistics.stdev(window_reg)))
            if cls_score > reg_score:
                alpha = reg_score / cls_score
            window_cls, window_reg = [], []
        expected.append(alpha)
    assert alphas[0] == pytest.approx(expected, rel=1e-10)
    assert len(results[0]["windows"]) == len(expected_windows) == 10
    for got_window, ref_window in zip(results[0]["windows"], expected_windows):
        assert got_window == pytest.approx(ref_window, rel=1e-9)
    assert min(expected) < 1.0


@pytest.mark.parametrize("field,value", [
    ("variant", 3), ("variant", "1"), ("variant", 1.0), ("variant", True), ("interval", 0), ("interval", -5),
    ("interval", 2.5), ("interval", 1_000_001), ("interval", True), ("lambda0", 0.0), ("lambda0", -1.0),
    ("lambda0", math.inf), ("lambda0", math.nan), ("lambda0", "1"), ("convention", "oficial"),
    ("records", "weigted"), ("sync_records", "yes"), ("sync_records", 1), ("lambda0_mode", "release"),
])
def test_alwa_config_errors_name_the_field(field, value):
    for make in (lambda: build_weighting({"method": "alwa", field: value}), lambda: ALWA(**{field: value})):
        with pytest.raises(ValidationError) as error:
            make()
        # the union's tag "alwa" comes first through build_weighting
        assert {e["loc"][1] if e["loc"][0] == "alwa" else e["loc"][0] for e in error.value.errors()} == {field}
    with pytest.raises(ConfigError) as config_error:  # the dict config's one-paragraph error
        validate_weighting_config({"method": "alwa", field: value})
    assert config_error.value.where == f"weighting.{field}"


def test_build_weighting_makes_the_configured_alwa():
    settings = dict(variant=2, lambda0=0.5, interval=20, convention="paper", records="raw", sync_records=False,
                    lambda0_mode="released")
    alwa = build_weighting({"method": "alwa", "head": "rpn", **settings})
    assert isinstance(alwa, ALWA)
    assert alwa.settings == ALWASettings(head="rpn", **settings)
    assert alwa.window.shape == (2, 20)
    assert ALWA(ALWASettings(**settings)).settings == ALWA(**settings).settings
    default = build_weighting({"method": "alwa"}).settings
    assert (default.variant, default.lambda0, default.interval, default.convention, default.records,
            default.sync_records, default.lambda0_mode, default.head) == (
        1, 1.0, 100, "official", "weighted", False, "paper", "auto")
    with pytest.raises(TypeError):
        ALWA(ALWASettings(), interval=3)


@pytest.mark.parametrize("changed", [
    {"variant": 2}, {"lambda0": 0.5}, {"interval": 20}, {"convention": "paper"}, {"records": "raw"},
    {"lambda0_mode": "released"},
])
def test_state_dict_refuses_other_settings_and_leaves_the_state_untouched(changed):
    alwa = ALWA(interval=10)
    for k in range(13):
        alwa(torch.tensor(1.0 + k % 3), torch.tensor(1.0))
    saved = alwa.state_dict()
    other = ALWA(**{"interval": 10, **changed})
    before = {key: value.clone() for key, value in other.state_dict().items() if torch.is_tensor(value)}
    with pytest.raises(ValueError, match=next(iter(changed))):
        other.load_state_dict(saved)
    after = other.state_dict()
    assert all(torch.equal(after[key], value) for key, value in before.items())
    assert after["_extra_state"]["calls"] == 0
    # sync_records and head may change between runs
    ALWA(interval=10, sync_records=True, head="rpn").load_state_dict(saved)


def test_lambda0_modes_against_a_hand_computation():
    """λ0 = 0.5, ALWA_1, C = 2, official (sample std), weighted records.

    Window 1 (both modes, w_cls = λ0 = 0.5): cls records 0.5·(4, 6) = (2, 3), reg 0.5·(2, 2) = (1, 1);
    scores 2.5 + √0.5 and 1 + 0: α1 = 1 / (2.5 + √0.5).
      paper:    w_cls = α1·λ0          released: w_cls = α1 (AnchorHead.loss: cls_weight = BBOX/CLS)
    Window 2: raw cls (8, 8), reg (2, 2): cls score w_cls·8, reg score 1 (std 0): α2 = 1 / (8·w_cls).
      paper:    w_cls = α2·λ0 = λ0 / (8·α1·λ0) = 1 / (8·α1)     released: w_cls = 1 / (8·α1): equal again
    Window 3: raw cls (1, 3), reg (2, 2): cls score w·(2 + √2), α3 = 1 / (w·(2 + √2)).
    """
    lam = 0.5
    alpha1 = 1 / (2.5 + math.sqrt(0.5))
    w2 = {"paper": alpha1 * lam, "released": alpha1}
    w3 = {"paper": lam / (8 * w2["paper"]), "released": 1 / (8 * w2["released"])}
    alpha3 = {mode: 1 / (w3[mode] * (2 + math.sqrt(2))) for mode in w3}
    w4 = {"paper": alpha3["paper"] * lam, "released": alpha3["released"]}
    assert w3["paper"] == pytest.approx(w3["released"])
    assert w2["released"] == pytest.approx(w2["paper"] / lam) and w4["released"] == pytest.approx(w4["paper"] / lam)
    cls_losses = [4.0, 6.0, 8.0, 8.0, 1.0, 3.0, 5.0]
    for mode in ("paper", "released"):
        alwa = ALWA(variant=1, lambda0=lam, interval=2, lambda0_mode=mode)
        expected = [lam, lam, w2[mode], w2[mode], w3[mode], w3[mode], w4[mode]]
        for cls, w in zip(cls_losses, expected):
            cls_w, reg_w = alwa(torch.tensor(cls, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
            assert float(cls_w) == pytest.approx(w * cls, rel=1e-12), mode
            assert float(reg_w) == pytest.approx(lam * 2.0, rel=1e-12)
            assert float(alwa.log_values()["cls"]) == pytest.approx(w, rel=1e-12)
        assert float(alwa.alpha) == pytest.approx(alpha3[mode], rel=1e-12)
