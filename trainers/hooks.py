"""What the engine tells the outside world: the hook interface and its fan-out.

The engine calls a *list* of hooks (MLflow, Tune/Train reports, a progress bar), each
one independent of the others: nothing wraps anything. Under ``torch.distributed``
every rank calls the hooks it was given — callers hand rank 0 its loggers and the
other ranks only what they need (Ray Train wants every rank's ``on_checkpoint``).
On ranks other than 0 ``on_checkpoint`` gets ``path=None`` and evaluations are empty.

Rows given to ``log_iterations`` are ``{"step", "epoch", "lr", "train/loss",
"train/<key>", "weight/…", "window/…"}`` (names: ``reports/schema.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


class TrainingHook:
    """No-op hooks; subclass the ones you need."""

    def start(self, config, start_iteration: int, total_iterations: int) -> None:
        """Training is about to start (or continue, when ``start_iteration > 0``)."""

    def on_iteration(self, iteration: int) -> None:
        """Every iteration, with host-side information only (progress bars)."""

    def log_iterations(self, rows: list[dict]) -> None:
        """The records of the iterations since the last call (every ``train.log_every``)."""

    def log_evaluation(self, epoch: int, iteration: int, metrics: dict[str, float]) -> None:
        """An evaluation's metrics (``val/…``)."""

    def log_detections(self, detections: list[dict], annotations: list[dict], image_ids: list,
                       class_names: list[str]) -> None:
        """The final evaluation's detections and ground truth, per test image (rank 0;
        COCO ground truth with ``iscrowd``)."""

    def wait(self) -> None:
        """Block until everything logged so far is stored (hooks that write in the
        background); called before each checkpoint file is written."""

    def on_checkpoint(self, path: Path | None, iteration: int, epoch: int) -> None:
        """A checkpoint was written (``path=None`` on ranks other than 0)."""

    def finish(self, status: str, reason: str, metrics: dict[str, float]) -> None:
        """Training ended with ``status`` (``reports.schema``); called exactly once."""


class Hooks(TrainingHook):
    """Calls each hook in order. ``finish`` reaches every hook even if one fails (the
    first failure is re-raised afterwards), so no run is left open by another's error."""

    def __init__(self, hooks: Iterable[TrainingHook] = ()):
        self.hooks = [hook for hook in hooks if hook is not None]

    def start(self, config, start_iteration, total_iterations):
        for hook in self.hooks:
            hook.start(config, start_iteration, total_iterations)

    def on_iteration(self, iteration):
        for hook in self.hooks:
            hook.on_iteration(iteration)

    def log_iterations(self, rows):
        for hook in self.hooks:
            hook.log_iterations(rows)

    def log_evaluation(self, epoch, iteration, metrics):
        for hook in self.hooks:
            hook.log_evaluation(epoch, iteration, metrics)

    def log_detections(self, detections, annotations, image_ids, class_names):
        for hook in self.hooks:
            hook.log_detections(detections, annotations, image_ids, class_names)

    def wait(self):
        for hook in self.hooks:
            hook.wait()

    def on_checkpoint(self, path, iteration, epoch):
        for hook in self.hooks:
            hook.on_checkpoint(path, iteration, epoch)

    def finish(self, status, reason, metrics):
        first_error = None
        for hook in self.hooks:
            try:
                hook.finish(status, reason, metrics)
            except BaseException as exc:  # every hook still finishes
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
