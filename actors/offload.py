"""Optimizer state on the CPU while the model trains on an accelerator (single-device actors).

``offload_optimizer_state(optimizer)`` rebuilds an optimizer of the same class and hyperparameters
over CPU master copies of the parameters. Each ``step`` moves the (already clipped) gradients to the
CPU, frees them on the device, runs the stock un-fused CPU update there (AdamW keeps its two moment
tensors, i.e. 2x the trainable parameters, on the CPU), and copies the updated masters back into
the device parameters. The device then holds only weights, gradients and activations; the price is
two host/device copies of the trainable parameters per step. Sharded groups get the same thing from
FSDP2's ``CPUOffloadPolicy`` instead.

On a CPU-only machine everything already lives on the CPU, so the wrapper is a no-op and is not
applied (``force=True`` applies it anyway: the tests check the mechanism that way).
"""

from __future__ import annotations

import torch

_CLASSES: dict[type, type] = {}


class _CPUOffloadMixin:
    """Mixed in front of a torch optimizer class; ``param_groups`` hold the CPU masters."""

    _device_params: list[torch.nn.Parameter]

    def _masters(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("the CPU-offloaded optimizer does not take a closure")
        for master, param in zip(self._masters(), self._device_params):
            master.grad = None if param.grad is None else param.grad.detach().to("cpu", master.dtype)
            param.grad = None  # the device copy is no longer needed: free it before the update
        super().step()
        for master, param in zip(self._masters(), self._device_params):
            param.copy_(master, non_blocking=True)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for param in self._device_params:
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.zero_()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.sync_masters_from_model()

    @torch.no_grad()
    def sync_masters_from_model(self) -> None:
        """After the model's weights were replaced (a checkpoint load), restart the masters from them."""
        for master, param in zip(self._masters(), self._device_params):
            master.copy_(param.detach().to("cpu", master.dtype))


def offload_optimizer_state(optimizer: torch.optim.Optimizer, force: bool = False) -> torch.optim.Optimizer:
    """The same optimizer with its state and master weights on the CPU (see the module docstring).

    Returns ``optimizer`` itself when every parameter is already on the CPU, unless ``force``.
    Apply before building an LR scheduler on it (the scheduler must see the returned object)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not force and all(p.device.type == "cpu" for p in params):
        return optimizer
    cls = type(optimizer)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"CPUOffloaded{cls.__name__}", (_CPUOffloadMixin, cls), {})
    groups = []
    for group in optimizer.param_groups:
        masters = [torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
                   for p in group["params"]]
        # fused/capturable kernels are accelerator features; the masters are stepped on the CPU.
        groups.append({**{k: v for k, v in group.items() if k not in ("params", "fused", "capturable")},
                       "params": masters})
    offloaded = _CLASSES[cls](groups)
    offloaded._device_params = params
    return offloaded
