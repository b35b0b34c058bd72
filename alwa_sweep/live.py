"""A live table of a sweep's trials in the terminal, redrawn in place (rich), as a
Ray Tune callback. Without a terminal (CI, a log file) it prints a plain snapshot at
most every ``every`` seconds instead."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback
from rich.console import Console
from rich.live import Live
from rich.table import Table

from reports.schema import STATUS_ERROR, STATUS_OK, STATUS_PENDING, STATUS_RUNNING


class LiveTable(Callback):
    """Trial name, status, iteration, loss and score of every trial."""

    def __init__(self, total: int, every: float = 10.0, console: Console | None = None):
        self.total = total
        self.every = every
        self.rows: dict[str, dict] = {}
        self._console = console
        self._live: Live | None = None
        self._last = 0.0

    @property
    def console(self) -> Console:
        # Made on first use, on the stdout of that moment (Tune pickles its callbacks:
        # a console bound to a captured stream at construction could not be pickled).
        if self._console is None:
            self._console = Console(file=sys.stdout)
        return self._console

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_console": None, "_live": None}

    def _row(self, trial) -> dict:
        return self.rows.setdefault(trial.trial_id, {"name": str(trial), "state": STATUS_PENDING,
                                                     "iteration": 0, "loss": None, "score": None})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = STATUS_RUNNING
        self._draw()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row["state"] = result.get("status", STATUS_RUNNING)
        row["iteration"] = max(row["iteration"], result.get("iteration", 0))
        if result.get("loss") == result.get("loss"):  # not NaN
            row["loss"] = result.get("loss")
        row["score"] = result.get("score")
        self._draw()

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        if row["state"] == STATUS_RUNNING:
            row["state"] = STATUS_OK
        self._draw(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._row(trial)["state"] = STATUS_ERROR
        self._draw(force=True)

    def on_experiment_end(self, trials, **info):
        if self._live is not None:
            self._live.update(self.table())
            self._live.stop()
            self._live = None

    def table(self) -> Table:
        done = sum(1 for r in self.rows.values() if r["state"] not in (STATUS_PENDING, STATUS_RUNNING))
        table = Table(title=f"trials: {done}/{self.total} finished", title_justify="left")
        for column, justify in (("trial", "left"), ("status", "left"), ("iter", "right"),
                                ("loss", "right"), ("mAP", "right")):
            table.add_column(column, justify=justify, overflow="ellipsis", max_width=60 if column == "trial" else None)
        for row in self.rows.values():
            table.add_row(row["name"], row["state"], str(row["iteration"]),
                          f"{row['loss']:.4f}" if row["loss"] is not None else "-",
                          f"{row['score']:.4f}" if row["score"] else "-")
        return table

    def _draw(self, force: bool = False):
        if self.console.is_terminal:
            if self._live is None:
                self._live = Live(self.table(), console=self.console, refresh_per_second=2, transient=False)
                self._live.start()
            else:
                self._live.update(self.table())
            return
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            self.console.print(self.table())
