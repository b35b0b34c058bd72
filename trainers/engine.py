"""One training run, end to end: data → detector → weighted losses → SGD → evaluation.

Read it top to bottom like torchvision's ``references/detection/engine.py``:
:func:`train` builds everything from a config and runs the epochs;
:func:`train_one_epoch` is the hot loop; :func:`evaluate` runs the test set.

What the loop guarantees:
- no host synchronisation per iteration: the losses and weights of every iteration are
  recorded on the device (:class:`~trainers.records.RecordBuffer`) and pulled every
  ``train.log_every`` iterations, which is also when divergence is detected;
- exact resume: checkpoints hold the model, optimizer, AMP scaler, weighting state,
  RNG state and the position inside the epoch; the sample order and flips are a
  function of (seed, epoch) (:mod:`trainers.sampling`), so a resumed CPU run repeats an
  uninterrupted one bit for bit;
- divergence is a result, not a crash: a non-finite loss ends the run with status
  ``nan``, a weighting method's non-finite weight with ``overflow``;
- under ``torch.distributed`` (Ray Train, torchrun): DDP, one shard of the data per
  rank, only rank 0 logs and checkpoints, evaluation gathers all ranks' detections.
  The weighting method runs per rank on that rank's losses, as in the released ALWA
  code (``weighting.sync_records`` all-reduces ALWA's records instead); checkpoints
  hold rank 0's weighting and RNG state;
- emulated workers (``train.emulate_workers = N``, :mod:`trainers.distributed`): each
  step trains N micro-batches as N DDP ranks would, each with its own weighting module
  and random stream, one optimizer step on the averaged gradient. Checkpoints hold every
  emulated rank's weighting and random state (``weighting_ranks``, ``rng["ranks"]``), so
  a resumed run continues bit for bit. The rows hold the mean over the micro-batches of
  ``train/loss`` and every ``train/*`` loss, and emulated rank 0's weights
  (``weight/*``, ``window/*``), the ones the released code logs (rank 0's).
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from trainers import distributed as dist_utils
from trainers.checkpoint import load_latest_checkpoint, save_checkpoint
from trainers.config import OptimizerConfig, TrainingConfig, load_config
from trainers.data.build import build_datasets
from trainers.data.transforms import collate_fn
from trainers.detectors import build_detector
from trainers.evaluation import coco_evaluate, voc_map
from trainers.evaluation.coco import coco_ground_truth
from trainers.records import RecordBuffer, first_non_finite
from trainers.sampling import FlipOnRequest, GroupedEpochSampler, RankBatchSampler, aspect_ratio_flags
from trainers.schedule import build_schedule
from trainers.weighting import WeightOverflowError, build_weighting

from reports.schema import (METRIC_LOSS, METRIC_LR, METRIC_MAP, STATUS_ERROR, STATUS_INTERRUPTED, STATUS_NAN,
                            STATUS_OK, STATUS_OVERFLOW, metric_train, metric_val, metric_weight, metric_weighted)
from trainers.errors import ConfigError, Interrupted, interruption_reason
from trainers.hooks import Hooks, TrainingHook

__all__ = ["STATUS_ERROR", "STATUS_INTERRUPTED", "STATUS_NAN", "STATUS_OK", "STATUS_OVERFLOW", "TrainResult",
           "TrainingHook", "evaluate", "train", "train_one_epoch"]


@dataclass
class TrainResult:
    status: str
    reason: str = ""
    iterations: int = 0
    metrics: dict = field(default_factory=dict)  # the last evaluation
    evaluations: list = field(default_factory=list)  # (epoch, metrics) per evaluation
    checkpoint: Path | None = None
    seconds: float = 0.0


class Diverged(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Position:
    """How far training has come: completed iterations, current epoch, batches done in it."""
    iteration: int = 0
    epoch: int = 0
    epoch_batches: int = 0


def select_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if dist_utils.is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(optimizer: OptimizerConfig, parameters) -> torch.optim.Optimizer:
    params = [p for p in parameters if p.requires_grad]
    if optimizer.type == "sgd":
        return torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.momentum,
                               weight_decay=optimizer.weight_decay)
    return torch.optim.AdamW(params, lr=optimizer.lr, weight_decay=optimizer.weight_decay)


def _to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in target.items()} for target in targets]
    return images, targets


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class Run:
    """The objects of one run, built from a resolved config, and where it stands.

    ``flush`` pulls the device records to the hooks (and detects divergence);
    ``checkpoint`` writes a checkpoint and tells the hooks.
    """

    def __init__(self, config: TrainingConfig, device: torch.device, workdir: Path,
                 hooks: TrainingHook | None = None, hand_off_checkpoints: bool = False):
        self.config = config
        self.device = device
        self.hooks = hooks or Hooks()
        self.checkpoint_dir = Path(workdir) / "checkpoints"
        self.hand_off_checkpoints = hand_off_checkpoints
        self.position = Position()
        self.evaluations: list = []  # (epoch, metrics) per evaluation
        self.buffer = RecordBuffer()
        self.last_checkpoint: Path | None = None
        dataset_cfg, train_cfg = config.dataset, config.train
        self.train_set, self.test_set = build_datasets(
            {**dataset_cfg.model_dump(), "flip": 0.0}, with_masks=config.model.detector == "mask_rcnn")
        model_cfg = config.model
        if model_cfg.num_classes is None:
            model_cfg = model_cfg.model_copy(update={"num_classes": len(self.train_set.class_names)})
        seed_everything(train_cfg.seed)
        model = build_detector(model_cfg).to(device)
        self.head = config.weighting.head
        model.weighted_head = self.head  # the head whose KPIs the detector reports (DTP)
        # One weighting module per emulated worker (one in a plain run): the released ALWA
        # keeps its records and α per GPU. weightings[0] is the one logged and `weighting`.
        self.emulate = train_cfg.emulate_workers
        self.weightings = nn.ModuleList([build_weighting(config.weighting) for _ in range(self.emulate)])
        self.weightings.to(device)  # learnable weights must live where the optimizer's state will
        self.weighting = self.weightings[0]
        params = list(model.parameters()) + list(self.weightings.parameters())
        self.optimizer = build_optimizer(config.optimizer, params)
        # Emulated rank k's learnable weights get k's own gradient (DDP does not average them).
        self.weighting_params = list(self.weightings.parameters()) if self.emulate > 1 else []
        self.buffer_keeper = dist_utils.BufferKeeper(model) if self.emulate > 1 else None
        if dist_utils.is_distributed():
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = model
        self.amp = train_cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        # mmdetection's GroupSampler per (virtual) rank, or (None) an EpochSampler
        make_sampler = (_grouped_samplers(self.train_set, train_cfg.batch_size, train_cfg.seed, dataset_cfg.flip)
                        if train_cfg.group_by_aspect_ratio else None)
        self.sampler = RankBatchSampler(len(self.train_set), seed=train_cfg.seed, flip_prob=dataset_cfg.flip,
                                        batch_size=train_cfg.batch_size, emulate=self.emulate,
                                        rank=dist_utils.rank(), world_size=dist_utils.world_size(),
                                        make_sampler=make_sampler)
        workers = dataset_cfg.num_workers
        self.loader = DataLoader(
            FlipOnRequest(self.train_set), batch_sampler=self.sampler,
            num_workers=workers, collate_fn=collate_fn, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            # An explicit generator keeps DataLoader from drawing worker seeds from the
            # global RNG, which would shift the RPN/ROI samplers' random streams on resume.
            generator=torch.Generator().manual_seed(train_cfg.seed))
        self.iters_per_epoch = math.ceil(self.sampler.per_rank / train_cfg.batch_size)
        self.schedule = build_schedule(config.schedule, config.optimizer.lr, self.iters_per_epoch)
        self.num_epochs = math.ceil(self.schedule.total_iters / self.iters_per_epoch)
        # Every emulated rank's random stream starts where a DDP rank's would: here.
        self.streams = dist_utils.RankStreams(self.emulate, device) if self.emulate > 1 else None

    # ---- records and checkpoints -------------------------------------------------------
    def flush(self) -> None:
        """Pull the pending records to the hooks; a non-finite loss ends the run."""
        rows = self.buffer.pull()
        if not rows:
            return
        bad = first_non_finite(rows, METRIC_LOSS)
        if dist_utils.is_distributed():
            # Every rank must stop together, or the others wait forever in DDP's all-reduce.
            flag = torch.tensor([bad is not None], dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and bad is None:
                raise Diverged(STATUS_NAN, "non-finite loss on another rank")
        if bad is not None:
            rows = rows[: rows.index(bad) + 1]
        self.hooks.log_iterations(rows)
        if bad is not None:
            raise Diverged(STATUS_NAN, f"non-finite loss at iteration {bad['step']}")

    def checkpoint(self) -> None:
        path = None
        if dist_utils.is_main_process():
            # The rows a checkpoint covers are stored before its file exists: a run killed
            # in between and resumed from that file never logs those steps again.
            self.hooks.wait()
            iteration = self.position.iteration
            if self.hand_off_checkpoints:  # a folder of its own, left to the hooks (see train)
                path = save_checkpoint(self.state_dict(), self.checkpoint_dir / f"ckpt_{iteration:08d}", iteration,
                                       keep=None)
            else:
                path = save_checkpoint(self.state_dict(), self.checkpoint_dir, iteration)
            self.last_checkpoint = path
        self.hooks.on_checkpoint(path, self.position.iteration, self.position.epoch)

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        position = self.position
        state = {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "rng": rng,
            "iteration": position.iteration,
            "epoch": position.epoch,
            "epoch_batches": position.epoch_batches,
            "evaluations": self.evaluations,
            "emulate_workers": self.emulate,
        }
        if self.emulate > 1:
            # Every emulated rank's weighting and random stream (under real DDP, rank 0
            # saves its own emulated ranks, as it saves only its own weighting otherwise).
            state["weighting_ranks"] = [weighting.state_dict() for weighting in self.weightings]
            rng["ranks"] = self.streams.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        saved_workers = int(state.get("emulate_workers", 1))
        if saved_workers != self.emulate:
            raise ConfigError("train.emulate_workers", f"is {self.emulate}, but the checkpoint was written by "
                              f"a run with {saved_workers}: the data shards, weighting states and "
                              "random streams of the emulated workers would not line up.",
                              f"Resume with train.emulate_workers: {saved_workers} (resources.emulate_workers "
                              "in a spec), or start afresh.")
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.emulate > 1:
            for weighting, weighting_state in zip(self.weightings, state["weighting_ranks"], strict=True):
                weighting.load_state_dict(weighting_state)
        else:
            self.weighting.load_state_dict(state["weighting"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.emulate > 1:
            self.streams.load_state_dict(state["rng"]["ranks"])
        self.position = Position(state["iteration"], state["epoch"], state["epoch_batches"])
        self.evaluations = list(state.get("evaluations", []))


def _grouped_samplers(dataset, batch_size: int, seed: int, flip_prob: float):
    """``make_sampler(rank, world_size)`` of aspect-ratio grouped samplers for ``dataset``."""
    flags = aspect_ratio_flags(dataset)

    def make_sampler(rank: int, world_size: int) -> GroupedEpochSampler:
        return GroupedEpochSampler(flags, batch_size, seed=seed, flip_prob=flip_prob, rank=rank,
                                   world_size=world_size)
    return make_sampler


def _weighted_total(run: Run, raw_losses: dict, kpis, weighting=None) -> tuple[torch.Tensor, dict]:
    """Apply the weighting method (``run.weighting``, or an emulated rank's) to its head's
    (cls, reg) pair; other losses keep weight 1."""
    weighting = run.weighting if weighting is None else weighting
    cls_key, reg_key = f"{run.head}_cls", f"{run.head}_reg"
    cls_w, reg_w = weighting(raw_losses[cls_key], raw_losses[reg_key], kpis=kpis)
    total = cls_w + reg_w
    for key, value in raw_losses.items():
        if key not in (cls_key, reg_key):
            total = total + value
    values = {METRIC_LOSS: total}
    values.update({metric_train(key): value for key, value in raw_losses.items()})
    values[metric_weighted(run.head, "cls")] = cls_w
    values[metric_weighted(run.head, "reg")] = reg_w
    for name, value in weighting.log_values().items():
        values[name if "/" in name else metric_weight(name)] = value
    return total, values


def _emulated_backward(run: Run, images, targets) -> dict:
    """One step's forward and backward as ``run.emulate`` DDP ranks: micro-batch k through
    emulated rank k's weighting and random stream, backward of ``loss_k / N`` (gradients
    accumulate; under real DDP only the last backward all-reduces). Returns the row:
    losses averaged over the micro-batches, weights of emulated rank 0."""
    model, scaler, count = run.model, run.scaler, run.emulate
    ddp = isinstance(model, DistributedDataParallel)
    rows = []
    for k, (images_k, targets_k) in enumerate(run.sampler.micro_batches(images, targets)):
        run.streams.enter(k)
        with model.no_sync() if ddp and k < count - 1 else nullcontext():
            with torch.autocast(run.device.type, enabled=run.amp):
                raw_losses = model(images_k, targets_k)
            if k == 0:
                run.buffer_keeper.keep()  # rank 0's running statistics are the ones DDP keeps
            try:
                total, values = _weighted_total(run, raw_losses, getattr(_unwrap(model), "kpis", None),
                                                run.weightings[k])
            except WeightOverflowError as exc:
                raise Diverged(STATUS_OVERFLOW, f"iteration {run.position.iteration + 1}, emulated worker "
                               f"{k}: {exc}") from exc
            scaler.scale(total / count).backward()
        run.streams.leave(k)
        rows.append(values)
    run.buffer_keeper.restore()
    for param in run.weighting_params:
        if param.grad is not None:
            param.grad.mul_(count)
    row = dict(rows[0])
    for name in row:  # losses: the mean over the micro-batches (float32 averaging on the device)
        if name == METRIC_LOSS or name.startswith("train/"):
            row[name] = torch.stack([r[name].detach().float() for r in rows]).mean()
    return row


def train_one_epoch(run: Run) -> None:
    """Train from ``run.position`` to the end of its epoch (or of the schedule)."""
    model, optimizer, scaler, train_cfg = run.model, run.optimizer, run.scaler, run.config.train
    position = run.position
    model.train()
    run.sampler.set_epoch(position.epoch, start=position.epoch_batches * train_cfg.batch_size)
    every = train_cfg.checkpoint_every_iters
    for images, targets in run.loader:
        if position.iteration >= run.schedule.total_iters:
            break
        lr = run.schedule.lr_at(position.iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = _to_device(images, targets, run.device)
        if run.emulate > 1:
            optimizer.zero_grad(set_to_none=True)
            values = _emulated_backward(run, images, targets)
        else:
            with torch.autocast(run.device.type, enabled=run.amp):
                raw_losses = model(images, targets)
            try:
                total, values = _weighted_total(run, raw_losses, getattr(_unwrap(model), "kpis", None))
            except WeightOverflowError as exc:
                raise Diverged(STATUS_OVERFLOW, f"iteration {position.iteration + 1}: {exc}") from exc
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
        if train_cfg.grad_clip:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], train_cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()

        position.iteration += 1
        position.epoch_batches += 1
        values[METRIC_LR] = lr
        run.buffer.add(position.iteration, position.epoch + 1, values)
        run.hooks.on_iteration(position.iteration)
        if position.iteration % train_cfg.log_every == 0:
            run.flush()
        if (every and position.iteration % every == 0 and position.epoch_batches < run.iters_per_epoch
                and position.iteration < run.schedule.total_iters):  # the epoch's end and the last: _train_epochs
            run.flush()
            run.checkpoint()


@dataclass
class Evaluation:
    """One pass over the test set: the metrics, and (rank 0) what they were computed from."""
    metrics: dict[str, float]
    detections: list = field(default_factory=list)  # per test image, in the test set's order
    image_indices: list = field(default_factory=list)


@torch.no_grad()
def evaluate(model, dataset, config: TrainingConfig, device: torch.device) -> Evaluation:
    """Detections on the test set (sharded across ranks) → VOC mAP or COCO AP on rank 0."""
    model = _unwrap(model)
    dist_utils.broadcast_buffers(model)  # every shard seen with rank 0's (the checkpoint's) statistics
    model.eval()
    train_cfg = config.train
    indices = list(range(len(dataset)))
    if train_cfg.eval_max_images:
        indices = indices[: train_cfg.eval_max_images]
    shard = indices[dist_utils.rank()::dist_utils.world_size()]
    loader = DataLoader(Subset(dataset, shard), batch_size=train_cfg.eval_batch_size,
                        num_workers=config.dataset.num_workers, collate_fn=collate_fn)
    results = []
    position = 0
    for images, _ in loader:
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, enabled=train_cfg.amp and device.type == "cuda"):
            outputs = model(images)
        for output in outputs:
            output = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}
            results.append((shard[position], output))
            position += 1
    model.train()
    gathered = dist_utils.gather_to_main(results)
    if gathered is None:
        return Evaluation({})
    by_index = dict(gathered)
    ordered = [by_index[i] for i in indices]
    if config.dataset.kind == "coco":
        metrics = _coco_metrics(dataset, indices, ordered, config)
    else:
        metrics = _voc_metrics(dataset, indices, ordered, config)
    return Evaluation(metrics, ordered, indices)


def _voc_metrics(dataset, indices, detections, config: TrainingConfig) -> dict[str, float]:
    annotations = [dataset.annotations[i] for i in indices]
    result = voc_map(detections, annotations, iou_threshold=config.evaluation.iou_threshold,
                     method=config.evaluation.method)
    metrics = {METRIC_MAP: float(result["map"])}
    for label, ap in result["ap"].items():
        metrics[metric_val(f"ap/{dataset.class_names[label - 1]}")] = float(ap)
    return metrics


def _coco_metrics(dataset, indices, detections, config: TrainingConfig) -> dict[str, float]:
    predictions = []
    for index, detection in zip(indices, detections):
        prediction = {"image_id": dataset.coco_image_id(index), **detection}
        if "masks" in prediction:
            prediction["masks"] = prediction["masks"][:, 0] > 0.5
        predictions.append(prediction)
    iou_types = ("bbox", "segm") if config.model.detector == "mask_rcnn" else ("bbox",)
    metrics = coco_evaluate(dataset.coco, predictions, dataset.label_to_cat_id, iou_types=iou_types)
    return {metric_val(name): float(value) for name, value in metrics.items()}


def _ground_truth(run: Run, image_indices: list) -> list:
    """The test images' ground truth as the evaluation saw it (COCO: boxes, labels and
    crowd flags from the annotation file, as COCOeval reads them)."""
    test_set = run.test_set
    if run.config.dataset.kind == "coco":
        return coco_ground_truth(test_set.coco, [test_set.coco_image_id(i) for i in image_indices],
                                 test_set.cat_id_to_label)
    return [test_set.annotations[i] for i in image_indices]


def _resume(run: Run, resume) -> None:
    """Load the newest loadable checkpoint of ``resume`` (a file or folder; ``True``:
    the run's own folder, a fresh start when it holds none)."""
    if not resume:
        return
    found = load_latest_checkpoint(run.checkpoint_dir if resume is True else resume)
    if found is None and resume is not True:
        raise ConfigError("--resume", f"{resume} holds no loadable checkpoint.",
                          "Pass a folder or file written by an earlier run (ckpt_*.pt), or start afresh.")
    if found is not None:
        run.load_state_dict(found[0])


def train(config, *, workdir: str | Path, hooks: Iterable[TrainingHook] = (),
          resume: str | Path | bool | None = None, device: torch.device | str | None = None,
          hand_off_checkpoints: bool = False) -> TrainResult:
    """Train one detector as ``config`` says (a :class:`TrainingConfig`, or a mapping or
    YAML path parsed into one); checkpoints go to ``workdir/checkpoints``.

    ``hooks`` are called in order (see :mod:`trainers.hooks`); whatever happens —
    divergence, an error, Ctrl-C or SIGTERM (:class:`~trainers.errors.Interrupted`) —
    each hook's ``finish`` is called exactly once with the run's status.
    ``resume``: a checkpoint file or directory, or ``True`` for ``workdir/checkpoints``.
    ``device`` overrides ``train.device``.

    The newest 3 checkpoints are kept in ``workdir/checkpoints``. With
    ``hand_off_checkpoints`` the engine keeps none: each one is written into a folder of
    its own, ``workdir/checkpoints/ckpt_<iteration>/`` (the file and its digest), that
    the hook receiving ``on_checkpoint`` persists and deletes — a sweep trial hands it
    to Ray Tune or Ray Train, whose ``num_to_keep`` is then the number of copies that
    exist (``alwa_sweep.trial``).
    """
    config = load_config(config)
    hooks = Hooks(hooks)
    result = TrainResult(status=STATUS_OK)
    started = time.perf_counter()
    try:
        device = torch.device(device) if device is not None else select_device(config.train.device)
        run = Run(config, device, Path(workdir), hooks, hand_off_checkpoints=hand_off_checkpoints)
        _resume(run, resume)
        if run.evaluations:
            result.metrics = dict(run.evaluations[-1][1])
        hooks.start(config, run.position.iteration, run.schedule.total_iters)
        _train_epochs(run, result)
    except Diverged as exc:
        result.status, result.reason = exc.status, exc.reason
    except (KeyboardInterrupt, Interrupted) as exc:
        hooks.finish(STATUS_INTERRUPTED, interruption_reason(exc), result.metrics)
        raise
    except BaseException as exc:
        hooks.finish(STATUS_ERROR, f"{type(exc).__name__}: {exc}", result.metrics)
        raise
    result.seconds = time.perf_counter() - started
    hooks.finish(result.status, result.reason, result.metrics)
    return result


def _train_epochs(run: Run, result: TrainResult) -> None:
    """The epochs, each followed by its evaluation (when due) and a checkpoint."""
    config, position = run.config, run.position
    try:
        while position.iteration < run.schedule.total_iters:
            train_one_epoch(run)
            position = run.position
            run.flush()
            epoch_done = position.epoch_batches >= run.iters_per_epoch
            finished = position.iteration >= run.schedule.total_iters
            if epoch_done:
                for weighting in run.weightings:
                    weighting.on_epoch_end(position.epoch)
                position.epoch += 1
                position.epoch_batches = 0
            every = config.train.eval_every
            if finished or (epoch_done and every and position.epoch % every == 0):
                # A schedule in iterations may end inside an epoch: that partial epoch counts.
                eval_epoch = position.epoch if epoch_done else position.epoch + 1
                evaluation = evaluate(run.model, run.test_set, config, run.device)
                run.evaluations.append((eval_epoch, evaluation.metrics))
                result.metrics = evaluation.metrics
                run.hooks.log_evaluation(eval_epoch, position.iteration, evaluation.metrics)
                if finished and evaluation.detections:
                    # what `report --ci` bootstraps over (reports/bootstrap.py, reports/coco_bootstrap.py)
                    run.hooks.log_detections(evaluation.detections, _ground_truth(run, evaluation.image_indices),
                                             evaluation.image_indices, run.test_set.class_names)
            run.checkpoint()
    finally:
        result.iterations = run.position.iteration
        result.evaluations = run.evaluations
        result.checkpoint = run.last_checkpoint
