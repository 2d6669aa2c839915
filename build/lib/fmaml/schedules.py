"""Meta learning-rate schedules that follow the run's length.

torch's CosineAnnealingLR takes a fixed `T_max`: a config that hard-codes it breaks as soon as
`--trainer.max_steps` changes, past `T_max` the rate rises again, and a resumed run restores the old
`T_max` from the scheduler's state. `CosineAnnealingToMaxSteps` anneals over the trainer's `max_steps`
instead (set by the MAML module at the start of every fit, after a resume's state is restored), in closed
form, so the rate at step t depends only on t and the current max_steps.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


class CosineAnnealingToMaxSteps(LRScheduler):
    """Cosine annealing from each group's initial rate to `eta_min` over `total_steps` scheduler steps,
    then `eta_min`: lr(t) = eta_min + (lr0 - eta_min) * (1 + cos(pi * min(t, T) / T)) / 2.

    total_steps: T; None (the default) takes the trainer's max_steps when training starts (fmaml.module),
        which must then be set (a run bounded only by max_time has no length to anneal over).
    """

    def __init__(
        self, optimizer: Optimizer, eta_min: float = 0.0, total_steps: int | None = None, last_epoch=-1
    ):
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(
                f"lr_scheduler total_steps={total_steps!r} must be an integer >= 1, or null for trainer.max_steps"
            )
        self.eta_min, self.total_steps = eta_min, total_steps
        self.follows_max_steps = total_steps is None
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        if self.last_epoch == 0:
            return list(self.base_lrs)
        if self.total_steps is None:
            raise RuntimeError(
                "CosineAnnealingToMaxSteps.total_steps is not set: give total_steps, or train through "
                "fmaml's MAML module, which sets it to trainer.max_steps"
            )
        t = min(self.last_epoch, self.total_steps)
        scale = (1 + math.cos(math.pi * t / self.total_steps)) / 2
        return [self.eta_min + (lr0 - self.eta_min) * scale for lr0 in self.base_lrs]


def check_max_steps_for_schedule(max_steps: int | None) -> int:
    """trainer.max_steps as the length to anneal over, or a clear error when the run has none."""
    if max_steps is None or max_steps < 1:
        raise ValueError(
            f"trainer.max_steps={max_steps}: model.lr_scheduler CosineAnnealingToMaxSteps anneals over "
            "max_steps, and a run bounded only by max_time has no length. Set --trainer.max_steps (max_time "
            "may still stop it earlier), or --model.lr_scheduler.init_args.total_steps"
        )
    return max_steps
