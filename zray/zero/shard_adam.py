"""zray's Adam(W) step over this rank's master segments on the GPU (zray/ops/gpu_adam.py).

The torch optimizer stays the owner of hyperparameters and state: param_groups (which LR
schedulers edit), and per segment the same "step" / "exp_avg" / "exp_avg_sq" tensors torch's
fused Adam keeps, so checkpoints, resharding and `optimizer.params.torch_adam` (torch's own
kernel) read and write one format. Only the arithmetic moves into one kernel launch per segment
that reads the gradient in its reduced dtype and writes the 16-bit compute copy as it goes.

Used when every segment is on one CUDA device (or, for tests, on the CPU under
TRITON_INTERPRET=1), the optimizer is exactly torch.optim.Adam or AdamW
without amsgrad / maximize / differentiable, Triton is importable, and the config does not ask
for torch's kernel; otherwise ZeroOptimizer steps the torch optimizer as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from zray.ops import gpu_adam

# (the optimizer tensor, its gradient, where the new 16-bit weights go or None)
Work = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class ShardAdam:
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @classmethod
    def maybe(cls, optimizer: torch.optim.Optimizer, prefer_torch: bool) -> ShardAdam | None:
        """A ShardAdam over `optimizer` where the kernel applies, else None (see module note)."""
        if prefer_torch or type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            return None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        device = params[0].device if params else None
        if device is None or any(p.device != device or p.dtype != torch.float32 for p in params):
            return None
        if not gpu_adam.available(device):  # CUDA; CPU only under Triton's interpreter (tests)
            return None
        for g in optimizer.param_groups:
            if g.get("amsgrad") or g.get("maximize") or g.get("differentiable"):
                return None
        return cls(optimizer)

    def _state(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """The segment's state, created as torch's fused Adam creates it (step on the device)."""
        state = self.optimizer.state[t]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=t.device)
            state["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)
        elif state["step"].device != t.device:
            # A state loaded for torch's non-fused path keeps its count on the host.
            state["step"] = state["step"].to(t.device, torch.float32)
        return state

    def step(self, work: Sequence[Work], scale: torch.Tensor) -> None:
        """Update every optimizer tensor; `work` holds a (tensor, grad, lowp) for each of them
        and `scale` multiplies each gradient."""
        by_tensor = {id(t): (g, lowp) for t, g, lowp in work}
        scale = scale.reshape(1).to(torch.float32)
        todo = []
        for group in self.optimizer.param_groups:
            decoupled = group.get(
                "decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW)
            )
            for t in group["params"]:
                todo.append((group, bool(decoupled), t, self._state(t), *by_tensor[id(t)]))
        if not todo:
            return
        # Advance every count in one launch; the kernels read it from the device.
        torch._foreach_add_([s["step"] for _, _, _, s, _, _ in todo], 1.0)
        for group, decoupled, t, state, grad, lowp in todo:
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            gpu_adam.adam_step_(
                t,
                grad,
                state["exp_avg"],
                state["exp_avg_sq"],
                state["step"],
                scale,
                lr=float(lr),  # a tensor lr costs a host sync here; schedulers set floats
                beta1=float(beta1),
                beta2=float(beta2),
                eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]),
                decoupled=decoupled,
                lowp=lowp,
            )
