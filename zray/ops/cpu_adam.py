"""Adam / AdamW on the CPU over float32 buffers: the compiled step, its reference, CPUAdam.

This is the optimizer half of ZeRO-Offload: fp32 master weights and Adam states live in CPU
memory and are stepped there. The step is bound by memory bandwidth (~12 flops per 28 bytes),
so the compiled kernel (csrc/cpu_adam.cpp) does everything in one pass over memory: it reads
the gradient as bf16, fp16 or fp32, multiplies it by one combined factor (unscale x clip x
1/world), updates the fp32 parameter and both moments, and optionally writes the bf16/fp16
copy of the new parameter (e.g. into pinned memory bound for the GPU) in the same pass.
Unfused, the same work takes four passes: widen, scale, step, narrow (~2x the bytes).

`adam_step_reference` beside it is the plain-PyTorch definition (torch.optim.Adam's
single-tensor code, operation for operation) that the tests compare with, and the fallback
when the extension is not built.

Shapes: every buffer of one call holds the same number of elements N, any shape, contiguous;
they are treated as flat [N].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from zray.ops import _extension

KERNEL = "adam_step"

# torch dtype -> key of `zray._C.DTYPE_CODES` (the C++ side owns the integer codes).
_GRAD_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
_OUT_DTYPES: dict[torch.dtype, str] = {torch.bfloat16: "bfloat16", torch.float16: "float16"}
_NO_OUT = -1  # the extension's out_dtype code for "no 16-bit copy"


def _check_tensor(
    t: Any, name: str, numel: int | None, dtypes: Iterable[torch.dtype], where: str
) -> None:
    """Raise naming `name` unless t is a contiguous CPU tensor of an allowed dtype and numel."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{where}: {name} device: got {t.device}; allowed: cpu")
    allowed = tuple(dtypes)
    if t.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{where}: {name} dtype: got {t.dtype}; allowed: {names}")
    if t.layout != torch.strided:
        raise ValueError(f"{where}: {name} layout: got {t.layout}; allowed: torch.strided (dense)")
    if not t.is_contiguous():
        # No silent .contiguous(): that would copy the whole buffer on every step.
        raise ValueError(
            f"{where}: {name} must be contiguous; got shape {tuple(t.shape)} with strides "
            f"{t.stride()} (call .contiguous() first, which copies)"
        )
    if numel is not None and t.numel() != numel:
        raise ValueError(
            f"{where}: {name} has {t.numel()} elements (shape {tuple(t.shape)}); "
            f"expected {numel}, the param's"
        )


def _check_step_args(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    out: torch.Tensor | None,
    step: float,
) -> None:
    """The checks both paths make, so the fallback fails exactly where the kernel would."""
    where = "adam_step"
    _check_tensor(param, "param", None, (torch.float32,), where)
    n = param.numel()
    _check_tensor(grad, "grad", n, _GRAD_DTYPES, where)
    _check_tensor(exp_avg, "exp_avg", n, (torch.float32,), where)
    _check_tensor(exp_avg_sq, "exp_avg_sq", n, (torch.float32,), where)
    if out is not None:
        _check_tensor(out, "out", n, _OUT_DTYPES, where)
    if not step >= 1:  # also rejects nan
        raise ValueError(f"{where}: step: got {step}; must be >= 1 (the count after incrementing)")


def adam_step_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    adamw_mode: bool = True,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
) -> None:
    """Plain-PyTorch definition of `adam_step`: torch.optim.Adam(W)'s single-tensor step.

    The operations and their order are torch's `_single_tensor_adam` (non-capturable), after
    the gradient is widened to float32 and multiplied by `grad_scale`. Costs a float32
    temporary of the gradient and of the denominator (8 bytes per element) and ~8 passes.
    """
    _check_step_args(param, grad, exp_avg, exp_avg_sq, out, step)
    beta1, beta2 = betas
    g = grad.float() * grad_scale  # a new tensor even for float32: `grad` is never modified
    if weight_decay != 0:
        if adamw_mode:
            param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    # torch writes bias_correction2 ** 0.5; sqrt is the correctly rounded spelling of it.
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    if out is not None:
        out.copy_(param)  # round to nearest, ties to even


def adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: float,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    adamw_mode: bool = True,
    grad_scale: float = 1.0,
    out: torch.Tensor | None = None,
    isa: str = "auto",
) -> None:
    """One Adam (adamw_mode=False: L2 decay) or AdamW step, in place, in one pass over memory.

    param, exp_avg, exp_avg_sq: float32, updated in place. grad: float32, bfloat16 or float16,
    multiplied by `grad_scale` (float32) first; never modified. step: the step count after
    incrementing (1 on the first step). out: None, or a bfloat16 / float16 tensor that receives
    the updated param rounded to nearest-even (e.g. pinned memory bound for the GPU). All
    contiguous CPU tensors with the same number of elements.

    Runs the compiled kernel on `torch.get_num_threads()` threads or, if `zray._C` is not
    built, `adam_step_reference` after one warning. isa: "auto", or a name from
    `zray.ops.kernel_report()["build_info"]["isa_supported"]` to force one code path (tests,
    benchmarks); every path gives the same bits.
    """
    _check_step_args(param, grad, exp_avg, exp_avg_sq, out, step)
    ext = _extension.EXTENSION.kernel(KERNEL)
    if ext is None:
        if isa != "auto":
            raise ValueError(
                f"adam_step: isa: got {isa!r}, but zray._C is not built; allowed: auto"
            )
        adam_step_reference(
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            step=step,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            adamw_mode=adamw_mode,
            grad_scale=grad_scale,
            out=out,
        )
        return
    codes = ext.DTYPE_CODES
    beta1, beta2 = betas
    ext.adam_step(
        param.data_ptr(),
        grad.data_ptr(),
        codes[_GRAD_DTYPES[grad.dtype]],
        exp_avg.data_ptr(),
        exp_avg_sq.data_ptr(),
        param.numel(),
        float(step),
        float(lr),
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        bool(adamw_mode),
        grad_scale=float(grad_scale),
        out=0 if out is None else out.data_ptr(),
        out_dtype=_NO_OUT if out is None else codes[_OUT_DTYPES[out.dtype]],
        isa=isa,
        num_threads=torch.get_num_threads(),
    )


class CPUAdam(torch.optim.Optimizer):
    """Adam / AdamW for contiguous float32 CPU tensors, stepped by zray's compiled kernel.

    The counterpart of DeepSpeedCPUAdam, with torch.optim.AdamW's numbers (adamw_mode=True,
    the default) or torch.optim.Adam's with L2 weight decay (adamw_mode=False): each param's
    state is torch's (`step` as a float32 0-dim tensor, `exp_avg`, `exp_avg_sq`), so state
    dicts load into torch.optim.Adam / AdamW and back. No amsgrad, maximize or sparse grads.

    `step()` uses each param's `.grad` (float32). `step_fused(grads, grad_scale, out_lowp)` is
    the offload step: 16-bit or float32 gradients from elsewhere (e.g. pinned buffers filled
    from the GPU), one combined scale factor, and optionally the 16-bit copy of each updated
    param written in the same pass.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        adamw_mode: bool = True,
    ) -> None:
        # The same ranges torch.optim.Adam accepts, with the value received in the message.
        if not float(lr) >= 0.0:
            raise ValueError(f"CPUAdam: lr: got {lr}; must be >= 0")
        if not eps >= 0.0:
            raise ValueError(f"CPUAdam: eps: got {eps}; must be >= 0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"CPUAdam: betas[{i}]: got {beta}; must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"CPUAdam: weight_decay: got {weight_decay}; must be >= 0")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "adamw_mode": adamw_mode,
        }
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                _check_tensor(
                    p, f"param_groups[{gi}]['params'][{pi}]", None, (torch.float32,), "CPUAdam"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict() of a torch.optim.Adam / AdamW state dict brings groups without
        # "adamw_mode"; torch's own "decoupled_weight_decay" says which one it was.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault(
                "adamw_mode", group.get("decoupled_weight_decay", self.defaults["adamw_mode"])
            )
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    # DeepSpeedCPUAdam keeps an int; torch (and zray) a float32 0-dim tensor.
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        """torch's format, plus torch.optim.Adam's name for adamw_mode in each group, so that
        torch.optim.Adam as well as AdamW loads it with the same decay rule."""
        state = super().state_dict()
        for group in state["param_groups"]:
            group["decoupled_weight_decay"] = bool(group["adamw_mode"])
        return state

    def _step_param(
        self,
        p: torch.Tensor,
        grad: torch.Tensor,
        group: dict[str, Any],
        grad_scale: float,
        out: torch.Tensor | None,
    ) -> None:
        state = self.state[p]
        if len(state) == 0:
            # As torch: step is a float32 0-dim CPU tensor, so checkpoints stay interchangeable.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        adam_step(
            p.detach(),
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            step=state["step"].item(),  # a CPU tensor: no device sync
            lr=float(group["lr"]),
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            adamw_mode=group["adamw_mode"],
            grad_scale=grad_scale,
            out=out,
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of every param that has a `.grad` (float32, dense)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._step_param(p, p.grad, group, 1.0, None)
        return loss

    @torch.no_grad()
    def step_fused(
        self,
        grads: Sequence[torch.Tensor],
        grad_scale: float = 1.0,
        out_lowp: Sequence[torch.Tensor | None] | None = None,
    ) -> None:
        """The offload step: one pass per param over gradient, master, states and 16-bit copy.

        grads: one contiguous CPU tensor per param, in param-group order (the order of
        `[p for g in param_groups for p in g["params"]]`), float32, bfloat16 or float16, with
        the param's number of elements (any shape). grad_scale: one factor applied to every
        gradient element first, e.g. 1 / (loss_scale * world_size) * clip_coef. out_lowp: None,
        or one entry per param: a bfloat16 / float16 tensor that receives the updated param, or
        None for no copy of that one. A 16-bit output whose address is a multiple of 32 bytes
        is written with streaming stores (the CPU skips reading its lines first); others work,
        with ordinary stores.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        if len(grads) != len(params):
            raise ValueError(
                f"CPUAdam.step_fused: grads: got {len(grads)} tensors; expected {len(params)}, "
                "one per param"
            )
        if out_lowp is not None and len(out_lowp) != len(params):
            raise ValueError(
                f"CPUAdam.step_fused: out_lowp: got {len(out_lowp)} tensors; expected "
                f"{len(params)}, one per param (or None)"
            )
        # torch's LR schedulers warn "lr_scheduler.step() before optimizer.step()" unless this
        # is set; they only watch step() (they wrap it), and this is a step too.
        self._opt_called = True
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                out = None if out_lowp is None else out_lowp[i]
                self._step_param(p, grads[i], group, grad_scale, out)
                i += 1
