"""A live table of a sweep's trials in the terminal (a Ray Tune callback)."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback


class LiveTable(Callback):
    """Prints trial name, state, iteration, loss and score; at most every ``every`` s."""

    def __init__(self, total: int, every: float = 10.0):
        self.total = total
        self.every = every
        self.rows: dict[str, dict] = {}
        self._last = 0.0

    def _row(self, trial) -> dict:
        return self.rows.setdefault(trial.trial_id, {"name": str(trial), "state": "pending",
                                                     "iteration": 0, "loss": None, "score": None})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "running"
        self._print(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["state"] = result.get("status", "running")
        row["iteration"] = max(row["iteration"], result.get("iteration", 0))
        if result.get("loss") == result.get("loss"):  # not NaN
            row["loss"] = result.get("loss")
        row["score"] = result.get("score")
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        if row["state"] == "running":
            row["state"] = "ok"
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = "error"
        self._print(trials, force=True)

    def _print(self, trials, force=False):
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return
        self._last = now
        done = sum(1 for r in self.rows.values() if r["state"] not in ("pending", "running"))
        lines = [f"[{time.strftime('%H:%M:%S')}] trials: {done}/{self.total} finished",
                 f"  {'trial':<48} {'status':<9} {'iter':>6} {'loss':>8} {'mAP':>7}"]
        for row in self.rows.values():
            loss = f"{row['loss']:.4f}" if row["loss"] is not None else "-"
            score = f"{row['score']:.4f}" if row["score"] else "-"
            lines.append(f"  {row['name'][:48]:<48} {row['state']:<9} {row['iteration']:>6} {loss:>8} {score:>7}")
        print("\n".join(lines), file=sys.stdout, flush=True)
