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
  hold rank 0's weighting and RNG state.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset

from trainers import distributed as dist_utils
from trainers.checkpoint import load_latest_checkpoint, save_checkpoint
from trainers.config import load_config
from trainers.data.build import build_datasets
from trainers.data.transforms import collate_fn
from trainers.detectors import build_detector
from trainers.evaluation import coco_evaluate, voc_map
from trainers.records import RecordBuffer, first_non_finite
from trainers.sampling import EpochSampler, FlipOnRequest
from trainers.schedule import build_schedule
from trainers.weighting import WeightOverflowError, build_weighting

STATUS_OK, STATUS_NAN, STATUS_OVERFLOW, STATUS_ERROR = "ok", "nan", "overflow", "error"


class TrainingLogger:
    """What the engine reports, as no-op hooks; subclass the ones you need.

    Only rank 0 calls them, unless ``all_ranks`` is true (Ray Train needs every rank to
    report at each checkpoint); then ranks other than 0 get ``on_checkpoint`` with
    ``path=None`` and ``log_evaluation`` with empty metrics, and nothing else.
    ``log_iterations`` receives rows
    ``{"step", "epoch", "lr", "train/loss", "train/<key>", "weight/…", "window/…"}``.
    """

    all_ranks = False

    def start(self, config: dict, start_iteration: int, total_iterations: int) -> None: ...

    def on_iteration(self, iteration: int) -> None:
        """Called every iteration with host-side information only (progress bars)."""

    def log_iterations(self, rows: list[dict]) -> None: ...

    def log_evaluation(self, epoch: int, iteration: int, metrics: dict[str, float]) -> None: ...

    def wait(self) -> None:
        """Block until everything logged so far is stored (loggers that write in the
        background); called before each checkpoint file is written."""

    def on_checkpoint(self, path: Path, iteration: int, epoch: int) -> None: ...

    def finish(self, status: str, reason: str, metrics: dict[str, float]) -> None: ...


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
class _Position:
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


def build_optimizer(optimizer_cfg: dict, parameters) -> torch.optim.Optimizer:
    params = [p for p in parameters if p.requires_grad]
    if optimizer_cfg["type"] == "sgd":
        return torch.optim.SGD(params, lr=optimizer_cfg["lr"], momentum=optimizer_cfg["momentum"],
                               weight_decay=optimizer_cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=optimizer_cfg["lr"], weight_decay=optimizer_cfg["weight_decay"])


def _to_device(images, targets, device):
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in target.items()} for target in targets]
    return images, targets


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


class _Run:
    """The objects of one run, built from a resolved config."""

    def __init__(self, config: dict, device: torch.device):
        self.config = config
        self.device = device
        dataset_cfg, train_cfg = config["dataset"], config["train"]
        detector = config["model"]["detector"]
        self.train_set, self.test_set = build_datasets(
            {**dataset_cfg, "flip": 0.0}, with_masks=detector == "mask_rcnn")
        model_cfg = dict(config["model"])
        if model_cfg.get("num_classes") is None:
            model_cfg["num_classes"] = len(self.train_set.class_names)
        scale = dataset_cfg["scale"]
        model_cfg.setdefault("min_size", min(scale))
        model_cfg.setdefault("max_size", max(scale))
        seed_everything(train_cfg["seed"])
        model = build_detector(model_cfg).to(device)
        self.head = config["weighting"]["head"]
        model.weighted_head = self.head  # the head whose KPIs the detector reports (DTP)
        self.weighting = build_weighting(config["weighting"])
        self.weighting.to(device)  # learnable weights must live where the optimizer's state will
        params = list(model.parameters()) + list(self.weighting.parameters())
        self.optimizer = build_optimizer(config["optimizer"], params)
        if dist_utils.is_distributed():
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        self.model = model
        self.amp = bool(train_cfg["amp"]) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        self.sampler = EpochSampler(len(self.train_set), seed=train_cfg["seed"],
                                    flip_prob=dataset_cfg["flip"], rank=dist_utils.rank(),
                                    world_size=dist_utils.world_size())
        workers = dataset_cfg["num_workers"]
        self.loader = DataLoader(
            FlipOnRequest(self.train_set), batch_size=train_cfg["batch_size"], sampler=self.sampler,
            num_workers=workers, collate_fn=collate_fn, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            # An explicit generator keeps DataLoader from drawing worker seeds from the
            # global RNG, which would shift the RPN/ROI samplers' random streams on resume.
            generator=torch.Generator().manual_seed(train_cfg["seed"]))
        self.iters_per_epoch = math.ceil(self.sampler.per_rank / train_cfg["batch_size"])
        self.schedule = build_schedule(config["schedule"], config["optimizer"]["lr"], self.iters_per_epoch)
        self.num_epochs = math.ceil(self.schedule.total_iters / self.iters_per_epoch)

    def state_dict(self, position: _Position, evaluations: list) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "rng": rng,
            "iteration": position.iteration,
            "epoch": position.epoch,
            "epoch_batches": position.epoch_batches,
            "evaluations": evaluations,
        }

    def load_state_dict(self, state: dict) -> tuple[_Position, list]:
        _unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.weighting.load_state_dict(state["weighting"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        position = _Position(state["iteration"], state["epoch"], state["epoch_batches"])
        return position, list(state.get("evaluations", []))


def _weighted_total(run: _Run, raw_losses: dict, kpis) -> tuple[torch.Tensor, dict]:
    """Apply the weighting method to its head's (cls, reg) pair; other losses keep weight 1."""
    cls_key, reg_key = f"{run.head}_cls", f"{run.head}_reg"
    cls_w, reg_w = run.weighting(raw_losses[cls_key], raw_losses[reg_key], kpis=kpis)
    total = cls_w + reg_w
    for key, value in raw_losses.items():
        if key not in (cls_key, reg_key):
            total = total + value
    values = {"train/loss": total}
    values.update({f"train/{key}": value for key, value in raw_losses.items()})
    values[f"train/{cls_key}_weighted"] = cls_w
    values[f"train/{reg_key}_weighted"] = reg_w
    for name, value in run.weighting.log_values().items():
        values[name if "/" in name else f"weight/{name}"] = value
    return total, values


def train_one_epoch(run: _Run, position: _Position, buffer: RecordBuffer, flush, checkpoint) -> None:
    """Train from ``position`` to the end of its epoch (or of the schedule)."""
    model, optimizer, scaler, train_cfg = run.model, run.optimizer, run.scaler, run.config["train"]
    model.train()
    batch_size = train_cfg["batch_size"]
    run.sampler.set_epoch(position.epoch, start=position.epoch_batches * batch_size)
    for images, targets in run.loader:
        if position.iteration >= run.schedule.total_iters:
            break
        lr = run.schedule.lr_at(position.iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, targets = _to_device(images, targets, run.device)
        with torch.autocast(run.device.type, enabled=run.amp):
            raw_losses = model(images, targets)
        try:
            total, values = _weighted_total(run, raw_losses, getattr(_unwrap(model), "kpis", None))
        except WeightOverflowError as exc:
            raise Diverged(STATUS_OVERFLOW, f"iteration {position.iteration + 1}: {exc}") from exc
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if train_cfg["grad_clip"]:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for group in optimizer.param_groups for p in group["params"]], train_cfg["grad_clip"])
        scaler.step(optimizer)
        scaler.update()

        position.iteration += 1
        position.epoch_batches += 1
        values["lr"] = lr
        buffer.add(position.iteration, position.epoch + 1, values)
        run.on_iteration(position.iteration)
        if position.iteration % train_cfg["log_every"] == 0:
            flush()
        every = train_cfg["checkpoint_every_iters"]
        if every and position.iteration % every == 0 and position.epoch_batches < run.iters_per_epoch:
            flush()
            checkpoint()


@torch.no_grad()
def evaluate(model, dataset, config: dict, device: torch.device) -> dict[str, float]:
    """Detections on the test set (sharded across ranks) → VOC mAP or COCO AP on rank 0."""
    model = _unwrap(model)
    model.eval()
    train_cfg = config["train"]
    indices = list(range(len(dataset)))
    if train_cfg["eval_max_images"]:
        indices = indices[: train_cfg["eval_max_images"]]
    shard = indices[dist_utils.rank()::dist_utils.world_size()]
    loader = DataLoader(Subset(dataset, shard), batch_size=train_cfg["eval_batch_size"],
                        num_workers=config["dataset"]["num_workers"], collate_fn=collate_fn)
    results = []
    position = 0
    for images, _ in loader:
        images = [image.to(device, non_blocking=True) for image in images]
        with torch.autocast(device.type, enabled=bool(train_cfg["amp"]) and device.type == "cuda"):
            outputs = model(images)
        for output in outputs:
            output = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}
            results.append((shard[position], output))
            position += 1
    model.train()
    gathered = dist_utils.gather_to_main(results)
    if gathered is None:
        return {}
    by_index = dict(gathered)
    ordered = [by_index[i] for i in indices]
    if config["dataset"]["kind"] == "coco":
        return _coco_metrics(dataset, indices, ordered, config)
    return _voc_metrics(dataset, indices, ordered, config)


def _voc_metrics(dataset, indices, detections, config) -> dict[str, float]:
    annotations = [dataset.annotations[i] for i in indices]
    evaluation = config["evaluation"]
    result = voc_map(detections, annotations, iou_threshold=evaluation["iou_threshold"],
                     method=evaluation["method"])
    metrics = {"val/map": float(result["map"])}
    for label, ap in result["ap"].items():
        metrics[f"val/ap/{dataset.class_names[label - 1]}"] = float(ap)
    return metrics


def _coco_metrics(dataset, indices, detections, config) -> dict[str, float]:
    predictions = []
    for index, detection in zip(indices, detections):
        prediction = {"image_id": dataset.coco_image_id(index), **detection}
        if "masks" in prediction:
            prediction["masks"] = prediction["masks"][:, 0] > 0.5
        predictions.append(prediction)
    iou_types = ("bbox", "segm") if config["model"]["detector"] == "mask_rcnn" else ("bbox",)
    metrics = coco_evaluate(dataset.coco, predictions, dataset.label_to_cat_id, iou_types=iou_types)
    return {f"val/{name}": float(value) for name, value in metrics.items()}


def train(config, *, workdir: str | Path, logger: TrainingLogger | None = None,
          resume: str | Path | bool | None = None, device: torch.device | str | None = None,
          overrides=None) -> TrainResult:
    """Train one detector as ``config`` says; checkpoints go to ``workdir/checkpoints``.

    ``resume``: a checkpoint file or directory, or ``True`` for ``workdir/checkpoints``
    (a fresh start when it holds none). ``device`` overrides ``train.device``.
    """
    config = load_config(config, overrides)
    logger = logger or TrainingLogger()
    rank_logger = logger if (dist_utils.is_main_process() or logger.all_ranks) else TrainingLogger()
    if not dist_utils.is_main_process():
        logger = TrainingLogger()
    workdir = Path(workdir)
    checkpoint_dir = workdir / "checkpoints"
    device = torch.device(device) if device is not None else select_device(config["train"]["device"])
    run = _Run(config, device)
    run.on_iteration = logger.on_iteration

    position, evaluations = _Position(), []
    if resume:
        found = load_latest_checkpoint(checkpoint_dir if resume is True else resume)
        if found is None and resume is not True:
            raise FileNotFoundError(f"no loadable checkpoint at {resume}")
        if found is not None:
            position, evaluations = run.load_state_dict(found[0])
    result = TrainResult(status=STATUS_OK, evaluations=evaluations,
                         metrics=dict(evaluations[-1][1]) if evaluations else {})
    buffer = RecordBuffer()

    def flush() -> None:
        rows = buffer.pull()
        if not rows:
            return
        bad = first_non_finite(rows, "train/loss")
        if dist_utils.is_distributed():
            # Every rank must stop together, or the others wait forever in DDP's all-reduce.
            flag = torch.tensor([bad is not None], dtype=torch.int32, device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and bad is None:
                raise Diverged(STATUS_NAN, "non-finite loss on another rank")
        if bad is not None:
            rows = rows[: rows.index(bad) + 1]
        logger.log_iterations(rows)
        if bad is not None:
            raise Diverged(STATUS_NAN, f"non-finite loss at iteration {bad['step']}")

    def checkpoint() -> None:
        path = None
        if dist_utils.is_main_process():
            # The rows a checkpoint covers are stored before its file exists: a run killed
            # in between and resumed from that file never logs those steps again.
            logger.wait()
            path = save_checkpoint(run.state_dict(position, evaluations), checkpoint_dir, position.iteration)
            result.checkpoint = path
        rank_logger.on_checkpoint(path, position.iteration, position.epoch)

    logger.start(config, position.iteration, run.schedule.total_iters)
    started = time.perf_counter()
    try:
        while position.iteration < run.schedule.total_iters:
            train_one_epoch(run, position, buffer, flush, checkpoint)
            flush()
            epoch_done = position.epoch_batches >= run.iters_per_epoch
            finished = position.iteration >= run.schedule.total_iters
            if epoch_done:
                run.weighting.on_epoch_end(position.epoch)
                position.epoch += 1
                position.epoch_batches = 0
            every = config["train"]["eval_every"]
            if finished or (epoch_done and every and position.epoch % every == 0):
                # A schedule in iterations may end inside an epoch: that partial epoch counts.
                eval_epoch = position.epoch if epoch_done else position.epoch + 1
                metrics = evaluate(run.model, run.test_set, config, device)
                evaluations.append((eval_epoch, metrics))
                result.metrics = metrics
                rank_logger.log_evaluation(eval_epoch, position.iteration, metrics)
            checkpoint()
    except Diverged as exc:
        result.status, result.reason = exc.status, exc.reason
    except BaseException as exc:
        logger.finish(STATUS_ERROR, f"{type(exc).__name__}: {exc}", result.metrics)
        raise
    result.iterations = position.iteration
    result.evaluations = evaluations
    result.seconds = time.perf_counter() - started
    logger.finish(result.status, result.reason, result.metrics)
    return result
