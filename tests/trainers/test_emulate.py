"""Emulated DDP workers (``train.emulate_workers``): one process trains as N DDP ranks.

The reference is real DDP: a 2-process gloo run, against a 1-process run emulating 2
workers, step by step (α of each rank, losses, parameters), and resume bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainers.test_engine import Collect, tiny_config
from trainers.checkpoint import load_latest_checkpoint
from trainers.config import load_config
from trainers.engine import Run, TrainResult, _train_epochs
from trainers.errors import ConfigError
from trainers.hooks import Hooks
from trainers.sampling import EpochSampler, RankBatchSampler

FULL_PARAMS_EVERY = 5  # steps between full copies of the parameters (the others: projections)


class Probe(Collect):
    """Collect + after every step: each emulated rank's α, a random projection of every
    parameter tensor (float64), and every FULL_PARAMS_EVERY steps all the parameters."""

    def __init__(self):
        super().__init__()
        self.run = None
        self.alphas, self.projections, self.params = [], [], {}
        self._directions = None

    def on_iteration(self, iteration):
        run = self.run
        self.alphas.append([float(w.alpha) for w in run.weightings] if hasattr(run.weighting, "alpha") else [])
        params = [p.detach().double() for p in run.model.parameters()]
        if self._directions is None:
            generator = torch.Generator().manual_seed(0)
            self._directions = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
        self.projections.append([float((p * d).sum()) for p, d in zip(params, self._directions)])
        if iteration % FULL_PARAMS_EVERY == 0:
            self.params[iteration] = torch.cat([p.flatten().float() for p in params])


def probed_train(config: dict, workdir) -> tuple[Probe, TrainResult]:
    """The engine's epochs (``trainers.engine.train`` without its hook bookkeeping) with a
    probe that can look at the run after every step."""
    probe = Probe()
    run = Run(load_config(config), torch.device("cpu"), Path(workdir), Hooks([probe]))
    probe.run = run
    result = TrainResult(status="ok")
    _train_epochs(run, result)
    return probe, result


def _ddp_probe_worker(rank: int, world: int, init_file: str, config: dict, workdir: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        probe, result = probed_train(config, workdir)
        torch.save({"rows": probe.rows, "alphas": probe.alphas, "projections": probe.projections,
                    "params": probe.params, "metrics": result.metrics, "status": result.status}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def run_ddp(config: dict, tmp_path: Path, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    tmp_path.mkdir(parents=True, exist_ok=True)
    out = str(tmp_path / "ddp")
    mp.spawn(_ddp_probe_worker, args=(world, str(tmp_path / "init"), config, str(tmp_path / "ddp_run"), out),
             nprocs=world)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(world)]


def relative_gap(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


CASES = {
    # (detector, weighting, iterations): the ALWA_1 run over >= 60 iterations,
    # RetinaNet with ALWA_2, and a Table 1 trial (fixed RPN weights, search_spaces/table1).
    "faster_rcnn-alwa1": ("faster_rcnn", {"method": "alwa", "variant": 1, "interval": 5}, 60),
    "retinanet-alwa2": ("retinanet", {"method": "alwa", "variant": 2, "interval": 4}, 16),
    "faster_rcnn-fixed-table1": ("faster_rcnn", {"method": "fixed", "head": "rpn", "cls": 0.25, "reg": 0.75}, 16),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_emulated_workers_train_as_two_process_ddp(synthetic_voc, tmp_path, case):
    detector, weighting, iterations = CASES[case]
    base = dict(model={"detector": detector}, weighting=weighting, dataset={"flip": 0.5},
                optimizer={"lr": 0.02 if detector == "faster_rcnn" else 0.01},
                schedule={"max_iters": iterations, "steps": [iterations - 5], "warmup_iters": 10})
    ddp_config = tiny_config(synthetic_voc, train={"batch_size": 2, "log_every": 10, "eval_every": 0}, **base)
    emulated_config = tiny_config(synthetic_voc, train={"batch_size": 2, "log_every": 10, "eval_every": 0,
                                                         "emulate_workers": 2}, **base)
    ranks = run_ddp(ddp_config, tmp_path)
    torch.set_num_threads(1)
    emulated, result = probed_train(emulated_config, tmp_path / "emulated")
    assert result.status == "ok" and all(rank["status"] == "ok" for rank in ranks)
    assert len(emulated.rows) == len(ranks[0]["rows"]) == iterations

    # α per rank: emulated rank k follows DDP rank k (the records and α of each GPU)
    if weighting["method"] == "alwa":
        for k in range(2):
            ddp_alpha = [step[0] for step in ranks[k]["alphas"]]
            emulated_alpha = [step[k] for step in emulated.alphas]
            assert relative_gap(emulated_alpha, ddp_alpha) < 1e-4, k
        if case == "faster_rcnn-alwa1":  # α moves: the ranks see different data, so their α differ
            assert [s[0] for s in emulated.alphas] != [s[1] for s in emulated.alphas]
    # losses: the emulated rows hold the mean over the micro-batches, DDP rank k its own
    for name in ("train/loss", "train/rpn_cls" if detector != "retinanet" else "train/retina_cls"):
        mean = [(a[name] + b[name]) / 2 for a, b in zip(ranks[0]["rows"], ranks[1]["rows"])]
        assert relative_gap([row[name] for row in emulated.rows], mean) < 1e-4, name
    # rank 0's weights and window statistics are logged under their usual names
    for name in [n for n in ranks[0]["rows"][-1] if n.startswith(("weight/", "window/"))]:
        ddp = [row.get(name, 0.0) for row in ranks[0]["rows"]]
        assert relative_gap([row.get(name, 0.0) for row in emulated.rows], ddp) < 1e-4, name
    # parameters after every step (projections) and in full every FULL_PARAMS_EVERY steps
    for step, (mine, theirs) in enumerate(zip(emulated.projections, ranks[0]["projections"]), 1):
        assert relative_gap(mine, theirs) < 1e-4, step
    assert sorted(emulated.params) == sorted(ranks[0]["params"])
    gaps = {step: relative_gap(emulated.params[step], ranks[0]["params"][step]) for step in emulated.params}
    assert max(gaps.values()) < 1e-4, gaps
    # the two DDP ranks hold the same model (DDP's invariant), and the evaluation agrees
    assert relative_gap(ranks[1]["projections"][-1], ranks[0]["projections"][-1]) == 0.0
    assert result.metrics["val/map"] == pytest.approx(ranks[0]["metrics"]["val/map"], abs=1e-3)
    # the checkpoints: parameters and BatchNorm running statistics (rank 0's, as DDP keeps)
    ddp_state, _ = load_latest_checkpoint(tmp_path / "ddp_run" / "checkpoints")
    emulated_state, _ = load_latest_checkpoint(tmp_path / "emulated" / "checkpoints")
    for key, value in ddp_state["model"].items():
        if value.is_floating_point():
            assert relative_gap(emulated_state["model"][key], value) < 1e-4, key
        else:
            assert torch.equal(emulated_state["model"][key], value), key
    print(f"{case}: max relative parameter gap {max(gaps.values()):.2e}, projections "
          f"{max(relative_gap(a, b) for a, b in zip(emulated.projections, ranks[0]['projections'])):.2e}")


@pytest.mark.slow
def test_two_real_workers_emulating_two_train_as_four_ddp_ranks(synthetic_voc, tmp_path):
    """2 processes × 2 emulated (DDP with no_sync for the first micro-batch) = 4 processes."""
    base = dict(weighting={"method": "alwa", "variant": 1, "interval": 3}, dataset={"flip": 0.5},
                schedule={"max_iters": 9, "steps": [7], "warmup_iters": 3})
    four = run_ddp(tiny_config(synthetic_voc, train={"batch_size": 2, "log_every": 3, "eval_every": 0}, **base),
                   tmp_path / "four", world=4)
    two = run_ddp(tiny_config(synthetic_voc, train={"batch_size": 2, "log_every": 3, "eval_every": 0,
                                                     "emulate_workers": 2}, **base), tmp_path / "two", world=2)
    for real in range(2):
        for k in range(2):
            virtual = four[real * 2 + k]
            assert relative_gap([step[k] for step in two[real]["alphas"]],
                                [step[0] for step in virtual["alphas"]]) < 1e-4, (real, k)
        mean = [(a["train/loss"] + b["train/loss"]) / 2
                for a, b in zip(four[2 * real]["rows"], four[2 * real + 1]["rows"])]
        assert relative_gap([row["train/loss"] for row in two[real]["rows"]], mean) < 1e-4
    gaps = [relative_gap(a, b) for a, b in zip(two[0]["projections"], four[0]["projections"])]
    assert len(gaps) == 9 and max(gaps) < 1e-4, gaps
    print(f"2x2 vs 4: max relative projection gap {max(gaps):.2e}")
    assert two[0]["metrics"]["val/map"] == pytest.approx(four[0]["metrics"]["val/map"], abs=1e-3)


def test_rank_batch_sampler_shards_as_ddp_ranks():
    """R real ranks × N emulated = the shards of N·R DDP ranks, batch by batch."""
    size, batch = 23, 3
    for real, emulate in ((1, 4), (2, 2), (4, 1)):
        virtual = [list(EpochSampler(size, seed=5, flip_prob=0.5, rank=v, world_size=real * emulate))
                   for v in range(real * emulate)]
        for rank in range(real):
            sampler = RankBatchSampler(size, seed=5, flip_prob=0.5, batch_size=batch, emulate=emulate,
                                       rank=rank, world_size=real)
            steps = list(sampler)
            assert len(steps) == len(sampler) == -(-len(virtual[0]) // batch)
            for step, keys in enumerate(steps):
                parts = sampler.micro_batches(keys, keys)
                for k, (part, _) in enumerate(parts):
                    assert part == virtual[rank * emulate + k][step * batch:(step + 1) * batch]
    # resuming mid-epoch skips the same prefix of every virtual rank
    sampler = RankBatchSampler(size, seed=5, flip_prob=0.5, batch_size=batch, emulate=2)
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.set_epoch(1, start=batch)
    assert list(sampler) == whole[1:]


def test_emulated_resume_continues_bit_for_bit(synthetic_voc, tmp_path):
    config = tiny_config(synthetic_voc, weighting={"method": "alwa", "variant": 1, "interval": 3},
                         dataset={"flip": 0.5}, schedule={"max_iters": 16, "steps": [12], "warmup_iters": 4},
                         train={"batch_size": 2, "checkpoint_every_iters": 5, "log_every": 4, "eval_every": 0,
                                "emulate_workers": 2})
    from trainers.engine import train

    uninterrupted = Collect()
    train(config, workdir=tmp_path / "a", hooks=[uninterrupted])
    with pytest.raises(KeyboardInterrupt):
        train(config, workdir=tmp_path / "b", hooks=[Collect(stop_at=8)])
    resumed = Collect()
    assert train(config, workdir=tmp_path / "b", hooks=[resumed], resume=True).status == "ok"
    assert [row["step"] for row in resumed.rows] == list(range(6, 17))  # from the checkpoint at 5
    expected = {row["step"]: row for row in uninterrupted.rows}
    for row in resumed.rows:
        assert row == expected[row["step"]]
    # every emulated rank's weighting state is in the checkpoint, and they differ
    a, _ = load_latest_checkpoint(tmp_path / "a" / "checkpoints")
    b, _ = load_latest_checkpoint(tmp_path / "b" / "checkpoints")
    assert len(a["weighting_ranks"]) == len(a["rng"]["ranks"]) == 2
    for left, right in zip(a["weighting_ranks"], b["weighting_ranks"]):
        assert all(torch.equal(left[key], right[key]) for key in left if isinstance(left[key], torch.Tensor))
    assert not torch.equal(a["weighting_ranks"][0]["window"], a["weighting_ranks"][1]["window"])
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    # a checkpoint of 2 emulated workers does not resume as 1 or 3
    with pytest.raises(ConfigError, match="train.emulate_workers"):
        train({**config, "train": {**config["train"], "emulate_workers": 3}}, workdir=tmp_path / "b",
              hooks=[Collect()], resume=True)


def test_emulation_refuses_what_it_cannot_reproduce(synthetic_voc):
    with pytest.raises(ConfigError, match="weighting.sync_records"):
        load_config(tiny_config(synthetic_voc, weighting={"method": "alwa", "sync_records": True},
                                train={"emulate_workers": 2}))
    with pytest.raises(ConfigError, match="train.grad_clip"):
        load_config(tiny_config(synthetic_voc, weighting={"method": "uncertainty"},
                                train={"emulate_workers": 2, "grad_clip": 10.0}))
    with pytest.raises(ConfigError, match="emulate_workers"):
        load_config(tiny_config(synthetic_voc, train={"emulate_workers": 0}))
    # allowed: per-rank records, learnable weights without clipping, one worker with anything
    load_config(tiny_config(synthetic_voc, weighting={"method": "uncertainty"}, train={"emulate_workers": 2}))
    load_config(tiny_config(synthetic_voc, weighting={"method": "alwa", "sync_records": True}))


def test_emulated_learnable_weights_get_their_own_rank_gradient(synthetic_voc, tmp_path):
    """Uncertainty weighting: emulated rank k's log-variances move by rank k's own gradient
    (DDP does not average them): after one SGD step from 0 with momentum buffers empty,
    s_k = −lr·(1 − exp(0)·L_k) = −lr·(1 − L_k) (d/ds of exp(−s)·L + s at s = 0 is 1 − L)."""
    config = tiny_config(synthetic_voc, weighting={"method": "uncertainty", "head": "rpn"},
                         optimizer={"lr": 0.01, "weight_decay": 0.0}, schedule={"max_iters": 1, "steps": [1],
                                                                                "warmup_iters": 0},
                         train={"batch_size": 2, "log_every": 1, "eval_every": 0, "emulate_workers": 2})
    probe = Probe()
    run = Run(load_config(config), torch.device("cpu"), tmp_path, Hooks([probe]))
    probe.run = run
    losses = []
    original = run.weightings[1].forward

    def recording(cls_loss, reg_loss, kpis=None):  # observe rank 1's raw losses
        losses.append((float(cls_loss.detach()), float(reg_loss.detach())))
        return original(cls_loss, reg_loss, kpis)

    run.weightings[1].forward = recording
    _train_epochs(run, TrainResult(status="ok"))
    cls_loss, reg_loss = losses[0]
    assert float(run.weightings[1].log_var_cls) == pytest.approx(-0.01 * (1 - cls_loss), rel=1e-5)
    assert float(run.weightings[1].log_var_reg) == pytest.approx(-0.01 * (1 - reg_loss), rel=1e-5)
    assert float(run.weightings[0].log_var_cls) != float(run.weightings[1].log_var_cls)


def emulate_spec(data: dict, **resources) -> dict:
    return {
        "name": "emulated", "experiment": "emulate-test",
        "base": {"dataset": {"kind": "voc", "root": str(data["root"]), "train_sets": data["train_sets"],
                             "test_sets": data["test_sets"], "scale": [128, 128], "num_workers": 0},
                 "model": {"detector": "faster_rcnn", "backbone": "tiny", "pretrained": "none"},
                 "schedule": {"unit": "iter", "max_iters": 8, "steps": [6]},
                 "train": {"batch_size": 2}},
        "grid": {"weighting": [{"method": "fixed", "cls": c, "reg": 1.0} for c in (0.25, 0.5, 1.0, 2.0, 4.0)]},
        "resources": {"cpus_per_worker": 1, "gpus_per_worker": 1, **resources},
        "estimate": {"hours_per_trial": 6.0},
    }


def test_spec_resources_set_every_trials_emulated_workers(synthetic_voc, tmp_path):
    from alwa_sweep.spec import load_spec

    spec = load_spec(emulate_spec(synthetic_voc, workers=1, emulate_workers=4), check_paths=False)
    assert [t.config.train.emulate_workers for t in spec.trials] == [4] * 5
    assert spec.resources.ranks == 4
    assert "emulate_workers" not in spec.raw["base"].get("train", {})  # spec.yaml keeps the spec as written
    plain = load_spec(emulate_spec(synthetic_voc, workers=4), check_paths=False)
    assert [t.config.train.emulate_workers for t in plain.trials] == [1] * 5
    bad = emulate_spec(synthetic_voc, workers=1, emulate_workers=4)
    bad["base"]["train"]["emulate_workers"] = 2
    with pytest.raises(ConfigError, match="resources.emulate_workers"):
        load_spec(bad, check_paths=False)
    bad = emulate_spec(synthetic_voc)
    bad["grid"] = {"train.emulate_workers": [1, 2]}
    with pytest.raises(ConfigError, match="resources.emulate_workers"):
        load_spec(bad, check_paths=False)


def test_validate_prints_the_makespan_of_each_layout(synthetic_voc, tmp_path, capsys):
    """5 trials of 4 DDP ranks, 6 h each on 4 GPUs, on 8 GPUs. By hand: 4 workers × 1: 2
    trials at once, ceil(5/2) = 3 waves × 6 h = 18 h; 2 × 2: 4 at once, 2 waves × 12 h =
    24 h; 1 × 4: 5 at once (of 8 slots), 1 wave × 24 h = 24 h."""
    import yaml

    from alwa_sweep.cli import main
    from alwa_sweep.commands.validate import layouts
    from alwa_sweep.spec import load_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(emulate_spec(synthetic_voc, workers=4)))
    assert main(["validate", str(path), "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "4 worker(s) x 1 emulated (spec)" in out and "18.0 h" in out and "24.0 h" in out
    found = {(l.workers, l.emulate_workers): l for l in layouts(load_spec(str(path)), 8)}
    assert {key: (l.concurrent, l.trial_time, l.makespan) for key, l in found.items()} == {
        (4, 1): (2, 6.0, 18.0), (2, 2): (4, 12.0, 24.0), (1, 4): (5, 24.0, 24.0)}
    # the same trials written as 1 worker × 4 emulated, measured at 24 h per trial
    spec = load_spec(emulate_spec(synthetic_voc, workers=1, emulate_workers=4, ) | {"estimate": {"hours_per_trial": 24.0}},
                     check_paths=False)
    assert {(l.workers, l.makespan) for l in layouts(spec, 8)} == {(4, 18.0), (2, 24.0), (1, 24.0)}
    with pytest.raises(SystemExit) as exit_info:  # argparse: one paragraph, exit 2
        main(["validate", str(path), "--gpus", "0"])
    assert exit_info.value.code == 2 and "--gpus" in capsys.readouterr().err
