"""Terminal progress for one training run (tqdm): iteration, loss, α, ETA."""

from __future__ import annotations

from tqdm.auto import tqdm

from trainers.engine import TrainingLogger


class ProgressBar(TrainingLogger):
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
        postfix = {"loss": f"{last['train/loss']:.4f}", "lr": f"{last['lr']:.2e}"}
        if "weight/alpha" in last:
            postfix["alpha"] = f"{last['weight/alpha']:.3f}"
        if self.last_map is not None:
            postfix["mAP"] = f"{self.last_map:.3f}"
        self.bar.set_postfix(postfix, refresh=False)

    def log_evaluation(self, epoch, iteration, metrics):
        main = metrics.get("val/map", metrics.get("val/ap"))
        if main is not None:
            self.last_map = main
            if self.bar is not None:
                self.bar.write(f"epoch {epoch}: {'mAP' if 'val/map' in metrics else 'AP'} = {main:.4f}")

    def finish(self, status, reason, metrics):
        if self.bar is not None:
            self.bar.close()
