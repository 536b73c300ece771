"""Activation checkpointing: keep a module's inputs, drop its intermediate activations, and
recompute them during backward.

Cost: one extra forward of each wrapped module per training step (~+33% compute for a
transformer whose every block is wrapped), for activation memory of one block's inputs
([B, T, D] per GPT block) instead of all its intermediates (~34 * B * T * D bytes at fp16 per
GPT block, Korthikanti et al. 2022, plus attention scores where SDPA has to keep them).

[Note: wrapping in place]
We replace the *instance's* ``forward`` rather than wrapping the module in another module:
- parameter names and state_dict keys stay exactly the same, so checkpoints load with and
  without checkpointing;
- ``module(...)`` still goes through ``nn.Module.__call__``, so forward pre/post hooks that
  other components register on the module (ZeRO-3 parameter gathering, metrics) run once,
  around the checkpointed forward.
During backward's recompute, torch calls the original forward directly: the wrapped
module's own hooks do NOT run again, while hooks of its submodules do, in full pre/post pairs
(they are reached through ``__call__``, and we turn off checkpoint's early stop). Recompute is triggered lazily, when backward first needs a saved
activation of the region, i.e. inside the module's backward after the backward hooks on its
outputs have fired.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCKS = "blocks"


class _CheckpointedForward:
    """Stands in for ``module.forward``; runs the original under torch's checkpoint.

    A plain object holding the module (rather than a closure) so that ``copy.deepcopy`` and
    pickling of the model carry the wrapping over to the copy, pointing at the copy.
    """

    def __init__(self, module: nn.Module, inner: Callable[..., Any] | None) -> None:
        self.module = module
        # An instance-level forward that was already there, else None: the class's forward,
        # looked up at call time.
        self.inner = inner

    def original(self) -> Callable[..., Any]:
        if self.inner is not None:
            return self.inner
        return type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self.original()
        if not torch.is_grad_enabled():
            # Nothing will be backpropagated (eval, no_grad, inference_mode): no reason to pay
            # for checkpoint's bookkeeping.
            return fn(*args, **kwargs)
        # Non-reentrant: supports kwargs and inputs that do not require grad, and works with
        # torch.autograd.grad. preserve_rng_state (default) replays the same dropout masks.
        # early_stop=False: run the whole forward again rather than stopping at the last saved
        # tensor, so the recompute's submodule pre/post hooks come in balanced pairs (a ZeRO-3
        # gather in a pre-hook is released by its post-hook). Costs only the ops after the last
        # saved tensor, e.g. a block's final residual add.
        return checkpoint(fn, *args, use_reentrant=False, early_stop=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), _CheckpointedForward)


def _wrap(module: nn.Module) -> None:
    if is_checkpointed(module):
        return  # idempotent: never checkpoint inside a checkpoint of the same module
    module.forward = _CheckpointedForward(module, module.__dict__.get("forward"))  # type: ignore[method-assign]


def _select(model: nn.Module, modules: str | list[str]) -> list[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs that ``modules`` designates, in model order."""
    if modules == BLOCKS:
        selected = []
        for list_name, container in model.named_modules():
            if not isinstance(container, nn.ModuleList):
                continue
            prefix = f"{list_name}." if list_name else ""
            for child_name, child in container.named_children():
                # A nested container has no forward of its own; its own children are found
                # when named_modules() reaches it.
                if not isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                    selected.append((prefix + child_name, child))
        if not selected:
            raise ValueError(
                f"activation_checkpointing: modules={BLOCKS!r} found no nn.ModuleList children "
                f"in {type(model).__name__}; name the block classes instead, one of "
                f"{_class_names(model)}"
            )
        return selected

    class_names = [modules] if isinstance(modules, str) else list(modules)
    wanted = set(class_names)
    selected = [(n, m) for n, m in model.named_modules() if type(m).__name__ in wanted]
    found = {type(m).__name__ for _, m in selected}
    missing = [c for c in class_names if c not in found]
    if missing:
        raise ValueError(
            f"activation_checkpointing: no module of class {missing} in "
            f"{type(model).__name__}; module classes present: {_class_names(model)}"
        )
    return selected


def _class_names(model: nn.Module) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules()})


def apply_activation_checkpointing(model: nn.Module, modules: str | list[str] | None) -> list[str]:
    """Checkpoint the chosen submodules of ``model`` in place; return their qualified names.

    ``modules``: None, nothing; ``"blocks"``, every child of every nn.ModuleList (the layers
    of a transformer); a class name or list of class names, every module whose class
    ``__name__`` is listed (ValueError naming the ones that match nothing). Idempotent:
    applying again wraps nothing twice, and returns the names of all selected modules.
    Should the selection nest (a block and its MLP), each is checkpointed: correct, but the
    inner one is recomputed twice.
    """
    if modules is None:
        return []
    selected = _select(model, modules)
    for _, module in selected:
        _wrap(module)
    return [name for name, _ in selected]


def remove_activation_checkpointing(model: nn.Module) -> list[str]:
    """Undo ``apply_activation_checkpointing`` everywhere in ``model``; return the names."""
    removed = []
    for name, module in model.named_modules():
        wrapper = module.__dict__.get("forward")
        if isinstance(wrapper, _CheckpointedForward):
            del module.forward
            if wrapper.inner is not None:
                module.forward = wrapper.inner  # type: ignore[method-assign]
            removed.append(name)
    return removed
