"""A FLOPs profiler in the manner of DeepSpeed's flops_profiler: one step, one table.

    report = profile_step(engine.module, lambda: engine.backward(engine(**batch)))
    print(report.table(depth=2))

`profile_step` runs the callable (a forward + backward) once under
torch.utils.flop_counter.FlopCounterMode, whose op formulas and totals are the reference,
and with forward hooks on every module that time its forward. It reports, per module: its
parameters, the forward + backward FLOPs of the ops it owns (inclusive of its submodules, as
FlopCounterMode does), its forward latency and that latency's share of the step.

[Note: attributing backward FLOPs] FlopCounterMode's own module tracker attributes backward
work with gradient hooks on each module's inputs and outputs, and loses its place on modules
whose output *is* their input (nn.Dropout(p=0), identity layers) and on the root (whose
output is the loss): backward FLOPs land on dropout layers and the root gets none. zray
swaps in `_ScopeTracker`, which labels every autograd node, when the forward op that creates
it runs, with the innermost module then running (`node.metadata`, via a TorchFunctionMode),
and during backward reads the label of the node autograd is executing
(`torch._C._current_autograd_node()`). Each FLOP then belongs to exactly one innermost
module and to its ancestors by name, so a module's FLOPs = its submodules' FLOPs + those of
the ops in its own forward, and the total is FlopCounterMode's, unchanged. Activation
checkpointing's recomputation runs module forwards inside backward and is charged to those
modules (it is real work the step did).

[Note: what the counter counts] torch's formulas cover matmuls (mm, addmm, bmm, baddbmm),
convolutions and the CUDA attention kernels (flash, memory-efficient, cuDNN); elementwise
ops, norms, softmax and embedding lookups count 0. On CPU, scaled_dot_product_attention runs
`_scaled_dot_product_flash_attention_for_cpu`, for which torch has no formula, so attention
counts 0 there; `count_cpu_attention=True` adds torch's own flash-attention formulas for it
(the 12·L·D·T term of `zray.metrics.flops`), at the price of no longer matching a plain
FlopCounterMode run on CPU.

Latencies are measured while the counter runs, so they include its Python overhead per op
(tens of microseconds): compare modules with one another, not with an unprofiled step; the
unprofiled breakdown is `zray.metrics.timer.StepTimer`'s job. On CUDA every forward hook
synchronizes the device (a host sync per module call: profiling steps only).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

_GLOBAL = "Global"  # FlopCounterMode's key for everything counted, inside modules or not
_LABEL = "zray_profiler_scope"  # key in autograd Node.metadata: the creating module's name
_OUTSIDE = "<outside the model>"  # label of nodes created outside every module of the model


def _cpu_attention_formulas() -> dict[Any, Any]:
    """torch's flash-attention formulas applied to the CPU flash kernel (same arguments:
    query, key, value first; the backward's grad_out before them)."""
    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: _raw(
            flop_registry[aten._scaled_dot_product_flash_attention]
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _raw(
            flop_registry[aten._scaled_dot_product_flash_attention_backward]
        ),
    }


def _raw(formula: Callable[..., int]) -> Callable[..., int]:
    """Registry entries already take tensors (shapes are read inside); mark the copy raw so
    FlopCounterMode does not wrap it a second time."""

    def count(*args: Any, **kwargs: Any) -> int:
        return formula(*args, **kwargs)

    count._get_raw = True  # type: ignore[attr-defined]
    return count


class _ScopeTracker:
    """Stands in for FlopCounterMode's ModuleTracker: `parents` is the set of module names the
    op now dispatching belongs to. Also times each module's forward."""

    def __init__(self, model: nn.Module, sync_cuda: bool) -> None:
        self.sync_cuda = sync_cuda
        self.names: dict[nn.Module, str] = {m: name for name, m in model.named_modules()}
        # "blocks.0.attn" -> {"Global", "", "blocks", "blocks.0", "blocks.0.attn"}
        self._ancestors: dict[str, frozenset[str]] = {}
        for name in self.names.values():
            parts = name.split(".") if name else []
            prefixes = {".".join(parts[:i]) for i in range(len(parts) + 1)}
            self._ancestors[name] = frozenset({_GLOBAL, *prefixes})
        self._nowhere = frozenset({_GLOBAL})
        self.stack: list[str] = []  # forward calls now running, innermost last
        self._started: list[float] = []
        self.forward_seconds: dict[str, float] = dict.fromkeys(self.names.values(), 0.0)
        self.calls: dict[str, int] = dict.fromkeys(self.names.values(), 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def parents(self) -> frozenset[str]:
        if self.stack:  # forward, or a forward recomputed inside backward
            return self._ancestors[self.stack[-1]]
        if torch._C._current_graph_task_id() == -1:  # not in backward: outside the model
            return self._nowhere
        node = torch._C._current_autograd_node()
        label = node.metadata.get(_LABEL) if node is not None else None
        return self._ancestors.get(label, self._nowhere) if label is not None else self._nowhere

    def _now(self) -> float:
        if self.sync_cuda:
            torch.cuda.synchronize()  # host sync: profiling only (see the module note)
        return time.perf_counter()

    def _pre(self, module: nn.Module, args: Any) -> None:
        self.stack.append(self.names[module])
        self._started.append(self._now())

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.stack.pop()
        self.forward_seconds[name] += self._now() - self._started.pop()
        self.calls[name] += 1

    def __enter__(self) -> _ScopeTracker:
        for module in self.names:
            # prepend: start timing before other pre-hooks (ZeRO-3's gather is the module's cost)
            self._handles.append(module.register_forward_pre_hook(self._pre, prepend=True))
            self._handles.append(module.register_forward_hook(self._post))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()
        self._started.clear()


class _NodeLabeller(TorchFunctionMode):
    """Labels the autograd nodes each torch call creates with the module running it.

    A composite call (cross_entropy = log_softmax + nll_loss) creates several nodes and only
    the last is its output's grad_fn, so walk back from it through the nodes not labelled
    yet: every earlier node was labelled when its own call returned, so the walk stops at
    the call's inputs and costs O(nodes the call created).
    """

    def __init__(self, tracker: _ScopeTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            scope = self.tracker.stack[-1] if self.tracker.stack else _OUTSIDE
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    _label(t.grad_fn, scope)
        return out


def _label(node: Any, scope: str) -> None:
    todo = [node]
    while todo:
        n = todo.pop()
        if n is None or _LABEL in n.metadata:
            continue
        if type(n).__name__ == "AccumulateGrad":
            continue  # a parameter's node lives across steps: leave it untouched
        n.metadata[_LABEL] = scope
        todo.extend(next_node for next_node, _ in n.next_functions)


@dataclass(frozen=True)
class ModuleProfile:
    """One module's line: `flops` (forward + backward) and `params` include its submodules;
    `forward_seconds` is its forward's wall time summed over its `calls`."""

    name: str  # qualified name as in named_modules(); "" for the model itself
    type: str
    depth: int  # 0 for the model, 1 for its children, ...
    params: int
    flops: int
    forward_seconds: float
    calls: int


@dataclass(frozen=True)
class ProfileReport:
    modules: tuple[ModuleProfile, ...]  # named_modules() order: parents before children
    total_flops: int  # everything FlopCounterMode counted in the step, inside modules or not
    step_seconds: float  # wall time of the whole callable, counter overhead included
    flops_by_op: dict[str, int]  # e.g. {"aten.mm": ..., "aten.addmm": ...}

    def module(self, name: str) -> ModuleProfile:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"ProfileReport: no module named {name!r}")

    @property
    def flops_outside_model(self) -> int:
        """FLOPs of ops outside the model's forward and its backward (a loss computed by the
        callable, for instance)."""
        return self.total_flops - self.modules[0].flops

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_flops": self.total_flops,
            "step_seconds": self.step_seconds,
            "flops_outside_model": self.flops_outside_model,
            "flops_by_op": dict(self.flops_by_op),
            "modules": [asdict(m) for m in self.modules],
        }

    def table(self, depth: int = 2) -> str:
        """The per-module table down to `depth` (0: the model alone), as aligned text."""
        step = self.step_seconds
        op_width = max((len(op) for op in self.flops_by_op), default=0)
        head = [
            "zray FLOPs profile: one step (forward + backward)",
            f"step wall time:      {step * 1e3:.2f} ms (profiling overhead included)",
            f"total FLOPs:         {_si(self.total_flops)}FLOP ({_si(self.total_flops / step) if step > 0 else '-'}FLOP/s)",
            f"outside the model:   {_si(self.flops_outside_model)}FLOP",
            "FLOPs by op:" + ("" if self.flops_by_op else " none"),
            *(
                f"  {op:<{op_width}}  {_si(v)}FLOP ({_pct(v, self.total_flops)})"
                for op, v in self.flops_by_op.items()
            ),
        ]
        rows = [("module", "params", "FLOPs", "FLOPs %", "fwd latency", "step %")]
        for m in self.modules:
            if m.depth > depth:
                continue
            label = f"{m.name.rsplit('.', 1)[-1]} ({m.type})" if m.name else f"{m.type} (model)"
            rows.append(
                (
                    "  " * m.depth + label,
                    _si(m.params),
                    _si(m.flops),
                    _pct(m.flops, self.total_flops),
                    f"{m.forward_seconds * 1e3:.3f} ms",
                    _pct(m.forward_seconds, step),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in rows
        ]
        rule = "-" * max(len(line) for line in [*head, *lines])
        return "\n".join([rule, *head, rule, lines[0], rule, *lines[1:], rule])


def _si(x: float) -> str:
    for factor, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {suffix}"
    return f"{x:g} " if isinstance(x, float) else f"{x} "


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole > 0 else "-"


def profile_step(
    model: nn.Module,
    run_step: Callable[[], Any],
    *,
    count_cpu_attention: bool = False,
) -> ProfileReport:
    """Run `run_step()` (one forward + backward of `model`) once and profile it.

    Pass the unwrapped module (`engine.module`), so names match its state_dict; hooks and
    modes are removed afterwards, even when the step raises. The gradients the step
    produces are real: follow it with the optimizer step as usual.
    """
    # FlopCounterMode's dispatch imports torch._dynamo on first use (~1-2 s): pay it here,
    # outside the timed region, rather than in the first module's latency.
    import torch._dynamo

    first = next(model.parameters(), None)
    sync_cuda = first is not None and first.device.type == "cuda"
    tracker = _ScopeTracker(model, sync_cuda)
    counter = FlopCounterMode(
        display=False, custom_mapping=_cpu_attention_formulas() if count_cpu_attention else None
    )
    if not hasattr(counter, "mod_tracker"):
        raise RuntimeError(
            f"profile_step: this torch ({torch.__version__}) FlopCounterMode has no "
            "mod_tracker attribute; zray's profiler needs it to attribute FLOPs to modules"
        )
    counter.mod_tracker = tracker  # type: ignore[assignment]  # see [Note: attributing backward FLOPs]
    with counter, _NodeLabeller(tracker):
        start = tracker._now()
        run_step()
        step_seconds = tracker._now() - start
    counts = counter.get_flop_counts()
    modules = tuple(
        ModuleProfile(
            name=name,
            type=type(m).__name__,
            depth=name.count(".") + 1 if name else 0,
            params=sum(p.numel() for p in m.parameters()),
            flops=sum(counts.get(name, {}).values()),
            forward_seconds=tracker.forward_seconds[name],
            calls=tracker.calls[name],
        )
        for name, m in model.named_modules()
    )
    return ProfileReport(
        modules=modules,
        total_flops=counter.get_total_flops(),
        step_seconds=step_seconds,
        flops_by_op={str(op): v for op, v in counts.get(_GLOBAL, {}).items()},
    )
