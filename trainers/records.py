"""Per-iteration records kept on the device and pulled to the host in batches.

Every iteration adds a handful of 0-d tensors (losses, weights); reading them one by
one would synchronise the GPU each iteration. The buffer stacks them on the device and
:meth:`RecordBuffer.pull` copies all pending iterations with one transfer.
"""

from __future__ import annotations

import math

import torch


class RecordBuffer:
    def __init__(self):
        self._host_rows: list[dict] = []  # step, epoch, lr and Python-float values
        self._device_rows: list[torch.Tensor] = []
        self._device_names: list[list[str]] = []

    def __len__(self) -> int:
        return len(self._host_rows)

    def add(self, step: int, epoch: int, values: dict) -> None:
        """Record one iteration; tensor values stay on their device until :meth:`pull`."""
        host = {"step": step, "epoch": epoch}
        names, tensors = [], []
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                names.append(name)
                tensors.append(value.detach().reshape(()).float())
            else:
                host[name] = float(value)
        self._host_rows.append(host)
        self._device_rows.append(torch.stack(tensors) if tensors else None)
        self._device_names.append(names)

    def pull(self) -> list[dict]:
        """All pending rows as plain dicts (one device→host copy), emptying the buffer."""
        rows, self._host_rows = self._host_rows, []
        device_rows, self._device_rows = self._device_rows, []
        names, self._device_names = self._device_names, []
        present = [r for r in device_rows if r is not None]
        if present:
            flat = torch.cat(present).cpu().tolist()
            offset = 0
            for row, row_names in zip(rows, names):
                for name in row_names:
                    row[name] = flat[offset]
                    offset += 1
        return rows


def first_non_finite(rows: list[dict], key: str) -> dict | None:
    """The first row whose ``key`` is NaN or infinite."""
    for row in rows:
        value = row.get(key)
        if value is not None and not math.isfinite(value):
            return row
    return None
