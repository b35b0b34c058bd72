"""Small helpers over ``torch.distributed`` (started by someone else: Ray Train or torchrun),
and what one process needs to train as several DDP workers (``train.emulate_workers``).

Emulated workers
----------------
With ``train.emulate_workers = N`` a process plays N DDP ranks: per step it trains on N
micro-batches of ``train.batch_size`` images — virtual ranks ``r·N + k`` of ``R·N`` when
it is real rank r of R (:class:`trainers.sampling.RankBatchSampler`) — each through its
own weighting module (ALWA's records and α per GPU, as released:
``mmdet/models/dense_heads/anchor_head.py`` keeps them on the head object of each
process), backward of ``loss_k / N`` per micro-batch (the gradients accumulate, so only
one micro-batch's graph is alive at a time), and one optimizer step on the accumulated
gradient — DDP's average over N·R ranks (under real DDP the last micro-batch's backward
all-reduces, the others run under ``no_sync``). What makes it the same computation as
N·R real ranks, not an approximation of it:

- **Normalisation.** DDP does not synchronise BatchNorm (no SyncBN in the paper's
  configs), so every rank normalises with its own batch's statistics: a micro-batch does
  the same. The R50-FPN body uses torchvision's ``FrozenBatchNorm2d`` (constant); the tiny
  backbone's BatchNorm2d, Double-Head's BatchNorm2d (over the micro-batch's RoIs) and
  RetinaNet's GroupNorm (per sample) train in batch mode. Their *running* statistics are
  DDP's too: DDP broadcasts rank 0's buffers at each forward, so rank 0's updates are the
  ones that last; :class:`BufferKeeper` restores the running statistics written by
  emulated rank 0 after the other micro-batches.
- **Random streams.** Every DDP rank seeds the same generator and then draws its own
  stream (the RPN's and ROI head's samplers); :class:`RankStreams` gives each virtual
  rank its own CPU (and CUDA) generator state, swapped in around its micro-batch.
- **Learnable weights** (uncertainty weighting) are per rank and not all-reduced under
  DDP: emulated rank k's weights get ``N ×`` the gradient of ``loss_k / N``, i.e. the
  gradient rank k computes.

The results agree with real DDP up to float32 summation order (measured in
tests/trainers/test_emulate.py). Refused, because real DDP and the emulation would differ or the
emulation is not implemented (:func:`check_emulation`): ALWA's ``sync_records`` (its
all-reduce runs over real ranks only) and ``train.grad_clip`` with learnable weights
(each DDP rank clips with its own weights' gradients, so real ranks' models drift apart).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def gather_to_main(items: list) -> list | None:
    """Concatenate every rank's list on rank 0 (``None`` elsewhere)."""
    if not is_distributed():
        return items
    gathered = [None] * world_size() if is_main_process() else None
    dist.gather_object(items, gathered, dst=0)
    if not is_main_process():
        return None
    return [item for part in gathered for item in part]


def broadcast_from_main(value):
    """Rank 0's ``value`` on every rank."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- emulated workers ------------------------------------------------------------------

def check_emulation(config) -> None:
    """Refuse the settings a ``train.emulate_workers > 1`` run cannot train as DDP would."""
    from trainers.errors import ConfigError
    from trainers.weighting import build_weighting

    workers = config.train.emulate_workers
    if workers == 1:
        return
    weighting = config.weighting
    if getattr(weighting, "sync_records", False):
        raise ConfigError("weighting.sync_records", f"true cannot be combined with train.emulate_workers = "
                          f"{workers}: ALWA's all-reduce of the records runs over real processes only, not "
                          "over the workers one process emulates.",
                          "Use sync_records: false (per-GPU records, as released), or real workers only.")
    if config.train.grad_clip and any(True for _ in build_weighting(weighting).parameters()):
        raise ConfigError("train.grad_clip", f"{config.train.grad_clip:g} with the learnable weights of "
                          f"{weighting.method!r} and train.emulate_workers = {workers}: under DDP each rank "
                          "clips with its own weights' gradients, so the ranks' models drift apart, which "
                          "one process cannot reproduce.",
                          "Leave train.grad_clip unset, or use train.emulate_workers: 1.")


class RankStreams:
    """One state of the default random generators (CPU, and CUDA of ``device``) per
    emulated rank, all starting from the current state (every DDP rank seeds alike).

    ``enter(k)`` before rank k's micro-batch, ``leave(k)`` after it. Both are host
    operations (the CUDA generator's seed and offset live on the host): no sync.
    """

    def __init__(self, count: int, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        current = self._get()
        self.states = [current] * count

    def _get(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.cuda:
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if self.cuda and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def enter(self, rank: int) -> None:
        self._set(self.states[rank])

    def leave(self, rank: int) -> None:
        self.states[rank] = self._get()

    def state_dict(self) -> list[dict]:
        return [dict(state) for state in self.states]

    def load_state_dict(self, states: list[dict]) -> None:
        if len(states) != len(self.states):
            raise ValueError(f"{len(states)} random states for {len(self.states)} emulated workers")
        self.states = [dict(state) for state in states]


def running_stat_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The buffers a training-mode forward writes: BatchNorm's running statistics."""
    buffers = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            buffers.extend(b for b in (module.running_mean, module.running_var, module.num_batches_tracked)
                           if b is not None)
    return buffers


class BufferKeeper:
    """Keeps the running statistics emulated rank 0 wrote (what DDP broadcasts from rank 0)."""

    def __init__(self, model: nn.Module):
        self.buffers = running_stat_buffers(model)
        self.saved: list[torch.Tensor] = []

    def keep(self) -> None:
        """After rank 0's forward: copy its buffers (device copies, no sync)."""
        if self.buffers:
            self.saved = [b.detach().clone() for b in self.buffers]

    def restore(self) -> None:
        """After the other ranks' forwards: put rank 0's values back."""
        for buffer, saved in zip(self.buffers, self.saved):
            buffer.copy_(saved)
        self.saved = []


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers on every rank (before evaluation: DDP only broadcasts them at a
    training forward, so after the last step the ranks' running statistics differ)."""
    if not is_distributed():
        return
    for buffer in running_stat_buffers(model):
        dist.broadcast(buffer, src=0)
