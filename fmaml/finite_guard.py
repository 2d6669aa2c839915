"""A non-finite meta-loss never reaches the weights, and no checkpoint is written from it.

On the CPU, where checking it costs nothing, training stops at once, before the update. On an accelerator,
a host check every meta-step would stall the queue of device work, so the update is applied or skipped on
the device (`_guarded_update`) and the host looks at the outcome only where it synchronises anyway: on
steps that write logs, before every checkpoint, and at the end (the module calls `raise_if_not_finite`
there). Training then stops, naming the first bad step, with the weights and the optimizer state as they
were before it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class FiniteGuard:
    """defer: None defers the check on accelerators only; tests force either way. hint: what to lower,
    for the error message."""

    def __init__(self, hint: str, defer: bool | None = None):
        self.hint, self.defer = hint, defer
        # The deferred check's state, on the device: the meta-step counter and the first non-finite step
        # (-1 while every meta-loss was finite). Counted there, not copied from the host every step.
        self._device_step: Tensor | None = None
        self._first_nonfinite_step: Tensor | None = None

    def step(self, module, optimizer, value: Tensor) -> None:
        """`module.manual_backward(value)` and `optimizer.step()`, unless the meta-loss is not finite."""
        if self._defers(value):
            self._guarded_update(module, optimizer, value)
            return
        if not torch.isfinite(value):
            raise FloatingPointError(
                f"the meta-loss became {value.item()} at step {module.global_step}: training stopped before "
                f"updating on it. {self.hint}"
            )
        module.manual_backward(value)
        optimizer.step()

    def _defers(self, value: Tensor) -> bool:
        return value.device.type != "cpu" if self.defer is None else self.defer

    def _guarded_update(self, module, optimizer, value: Tensor) -> None:
        """backward and optimizer.step(), kept on the device only while every meta-loss so far was finite:
        from the first non-finite one on, each weight and optimizer-state tensor is put back as it was."""
        if self._device_step is None:  # once per fit (or resume): the only host-to-device copy
            self._device_step = torch.tensor(module.global_step, device=value.device)
            self._first_nonfinite_step = torch.full_like(self._device_step, -1)
        step = self._device_step
        healthy = self._first_nonfinite_step < 0
        finite = torch.isfinite(value.detach())
        keep = healthy & finite
        self._first_nonfinite_step = torch.where(healthy & ~finite, step, self._first_nonfinite_step)
        module.manual_backward(value)
        before = {id(t): t.detach().clone() for t in _update_tensors(optimizer, keep.device)}
        optimizer.step()
        with torch.no_grad():
            for t in _update_tensors(optimizer, keep.device):
                # State the first step creates (Adam's moments) goes back to "absent", i.e. zeros.
                old = before.get(id(t))
                t.copy_(torch.where(keep, t, torch.zeros_like(t) if old is None else old))
        self._device_step = step + 1

    def is_finite(self) -> bool:
        """False once a deferred check has seen a non-finite meta-loss (a host sync; not per step)."""
        return self._first_nonfinite_step is None or int(self._first_nonfinite_step) < 0

    def raise_if_not_finite(self, seen_at_step: int) -> None:
        if self.is_finite():
            return
        raise FloatingPointError(
            f"the meta-loss became non-finite at step {int(self._first_nonfinite_step)} (seen at step "
            f"{seen_at_step}: on an accelerator it is checked where the host waits anyway): training "
            f"stopped. No update was applied from that step on, and no checkpoint holds that state. {self.hint}"
        )


def _update_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> list[Tensor]:
    """What optimizer.step() changes on `device`: the parameters and their state tensors (moments, step)."""
    tensors = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            tensors.append(p)
            tensors += [v for v in optimizer.state.get(p, {}).values() if isinstance(v, Tensor)]
    return [t for t in tensors if t.device == device]
