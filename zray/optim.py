"""Building the torch optimizer that steps the master-weight shards.

The optimizer never sees the model's parameters: it sees one fp32 tensor per (unit, param group)
on this rank (a *segment* of the master shard). Adam, AdamW and SGD are element-wise, so
stepping shards gives exactly the numbers that stepping whole parameters would.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

ParamGroups = list[dict[str, Any]]

# Hyperparameter keys a param group may carry besides "params" (per-group overrides).
_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov")


def normalize_param_groups(model: nn.Module, model_parameters: Iterable[Any] | None) -> ParamGroups:
    """Turn deepspeed.initialize's `model_parameters` into a list of param-group dicts.

    Accepts None (all trainable parameters), an iterable of parameters, of (name, parameter)
    pairs, or of param-group dicts (as Hugging Face builds for decay / no-decay).
    """
    if model_parameters is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if isinstance(model_parameters, torch.Tensor):
        # list() would split it into rows: say what was meant instead of failing later.
        raise ValueError(
            f"model_parameters: got a single tensor of shape {tuple(model_parameters.shape)}; "
            "allowed: an iterable of parameters, of (name, parameter) pairs or of param groups"
        )
    items = list(model_parameters)
    if items and all(isinstance(x, dict) for x in items):
        groups = []
        for i, g in enumerate(items):
            if "params" not in g:
                raise ValueError(f"model_parameters[{i}]: a param group needs a 'params' entry")
            params = g["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            params = [p[1] if isinstance(p, tuple) else p for p in params]
            for j, p in enumerate(params):
                if not isinstance(p, torch.Tensor):
                    raise ValueError(
                        f"model_parameters[{i}]['params'][{j}]: got {type(p).__name__}; "
                        "allowed: parameters"
                    )
            groups.append({**g, "params": params})
        return groups
    params = [x[1] if isinstance(x, tuple) else x for x in items]
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise ValueError(
                f"model_parameters[{i}]: got {type(p).__name__}; allowed: parameters, "
                "(name, parameter) pairs or param-group dicts"
            )
    return [{"params": params}]


def build_optimizer(
    spec: Any,
    groups: ParamGroups,
    client: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
) -> torch.optim.Optimizer:
    """Create the optimizer over master segments.

    `groups` hold the segments and the per-group overrides. `spec` is `Config.optimizer`
    (type and params), used when no client optimizer is given. A client optimizer instance is
    rebuilt with its class and defaults over the segments; a callable is called with the groups.
    """
    if client is not None:
        if isinstance(client, torch.optim.Optimizer):
            return type(client)(groups, **_init_kwargs(type(client), client.defaults))
        return client(groups)
    if spec is None:
        raise ValueError(
            "optimizer: no optimizer given; set the config's 'optimizer' block "
            "(type Adam, AdamW or SGD) or pass optimizer= to zray.initialize"
        )
    kind = spec.type
    if kind in ("Adam", "AdamW"):
        cls = torch.optim.AdamW if spec.decoupled_weight_decay else torch.optim.Adam
        # On CUDA, torch's fused kernel updates every segment in one pass over (param, grad, m,
        # v) and can unscale the gradients as it reads them (see ZeroOptimizer.update); the
        # default multi-tensor path makes several passes. Measured in benchmarks/RESULTS.md.
        # On the CPU the default stays: the equivalence tests compare against it bit for bit.
        fused = _all_cuda(groups)
        return cls(
            groups,
            lr=spec.lr,
            betas=tuple(spec.betas),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            fused=fused or None,
        )
    if kind == "SGD":
        return torch.optim.SGD(
            groups,
            lr=spec.lr,
            momentum=spec.momentum,
            dampening=spec.dampening,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
        )
    raise ValueError(f"optimizer.type: got {kind!r}; allowed: 'Adam', 'AdamW', 'SGD'")


def _init_kwargs(cls: type, defaults: dict[str, Any]) -> dict[str, Any]:
    """The defaults the class's constructor takes. torch keeps derived entries in `defaults`
    too (AdamW records decoupled_weight_decay=True but its __init__ does not accept it)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(defaults)
    return {k: v for k, v in defaults.items() if k in params}


def _all_cuda(groups: ParamGroups) -> bool:
    tensors = [t for g in groups for t in g["params"]]
    return bool(tensors) and all(t.is_cuda and t.dtype == torch.float32 for t in tensors)


def group_overrides(group: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters a user's param group sets for itself."""
    return {k: v for k, v in group.items() if k in _GROUP_KEYS}


def build_cpu_optimizer(
    spec: Any,
    groups: ParamGroups,
    client: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer for offloaded master weights: zray's compiled CPU Adam / AdamW."""
    from zray.errors import ConfigError
    from zray.ops.cpu_adam import CPUAdam

    if client is not None:
        if not isinstance(client, (torch.optim.Adam, torch.optim.AdamW)):
            raise ConfigError(
                "zero_optimization.offload_optimizer.device",
                "cpu",
                "a config optimizer or a client torch.optim.Adam/AdamW (the CPU step is Adam)",
                f"got a client {type(client).__name__}",
            )
        d = client.defaults
        decoupled = isinstance(client, torch.optim.AdamW)
        return CPUAdam(
            groups,
            lr=d["lr"],
            betas=tuple(d["betas"]),
            eps=d["eps"],
            weight_decay=d["weight_decay"],
            adamw_mode=decoupled,
        )
    if spec is None or spec.type not in ("Adam", "AdamW"):
        raise ConfigError(
            "zero_optimization.offload_optimizer.device",
            "cpu",
            "with optimizer type Adam or AdamW (zray's CPU step is Adam)",
            f"optimizer is {None if spec is None else spec.type}",
        )
    return CPUAdam(
        groups,
        lr=spec.lr,
        betas=tuple(spec.betas),
        eps=spec.eps,
        weight_decay=spec.weight_decay,
        adamw_mode=spec.decoupled_weight_decay,
    )
