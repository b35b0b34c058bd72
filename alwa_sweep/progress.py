"""Terminal progress for one training run (tqdm): iteration, loss, α, ETA."""

from __future__ import annotations

from tqdm.auto import tqdm

from reports.schema import METRIC_ALPHA, METRIC_LOSS, METRIC_LR, METRIC_MAP, main_metric
from trainers.hooks import TrainingHook


class ProgressBar(TrainingHook):
    def __init__(self, description: str = "train", disable: bool | None = None):
        self.description = description
        self.disable = disable
        self.bar = None
        self.last_map = None

    def start(self, config, start_iteration, total_iterations):
        self.bar = tqdm(total=total_iterations, initial=start_iteration, desc=self.description,
                        unit="it", dynamic_ncols=True, disable=self.disable)

    def on_iteration(self, iteration):
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)

    def log_iterations(self, rows):
        if self.bar is None or not rows:
            return
        last = rows[-1]
        postfix = {"loss": f"{last[METRIC_LOSS]:.4f}", "lr": f"{last[METRIC_LR]:.2e}"}
        if METRIC_ALPHA in last:
            postfix["alpha"] = f"{last[METRIC_ALPHA]:.3f}"
        if self.last_map is not None:
            postfix["mAP"] = f"{self.last_map:.3f}"
        self.bar.set_postfix(postfix, refresh=False)

    def log_evaluation(self, epoch, iteration, metrics):
        main = main_metric(metrics)
        if main is not None:
            self.last_map = main
            if self.bar is not None:
                self.bar.write(f"epoch {epoch}: {'mAP' if METRIC_MAP in metrics else 'AP'} = {main:.4f}")

    def finish(self, status, reason, metrics):
        if self.bar is not None:
            self.bar.close()
