"""Which parameters go into which flat unit, for each stage.

Stages 0-2 pack parameters into buckets of at most `reduce_bucket_size` elements, walking the
model's parameters in reverse registration order: backward produces gradients roughly in that
order, so a bucket fills up (and can be reduced) while the rest of backward still runs.

Stage 3 makes one unit per *block*: every child of an nn.ModuleList (the transformer layers of
virtually every model), plus the root for what lies outside the blocks (embeddings, final norm,
head). A block's parameters are gathered together before its forward and released after it.
Parameters at or below `stage3_param_persistence_threshold` elements are kept whole instead,
in one persistent unit, because gathering many tiny tensors costs more in latency than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class UnitSpec:
    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]
    on_demand: bool  # stage 3 gather-before-use; False: kept whole between steps


def named_unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """model.named_parameters() already drops repeats of a tied parameter (first name wins)."""
    return list(model.named_parameters())


def bucket_units(model: nn.Module, bucket_numel: int) -> list[UnitSpec]:
    """Stages 0-2: contiguous buckets in reverse registration order."""
    buckets: list[list[tuple[str, nn.Parameter]]] = [[]]
    size = 0
    for name, p in reversed(named_unique_params(model)):
        if buckets[-1] and size + p.numel() > bucket_numel:
            buckets.append([])
            size = 0
        buckets[-1].append((name, p))
        size += p.numel()
    return [
        UnitSpec(f"bucket{i}", model, params, on_demand=False)
        for i, params in enumerate(buckets)
        if params
    ]


def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every child of every nn.ModuleList, outermost lists only (blocks inside blocks stay)."""
    found: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList):
            continue
        if any(t == "" or name.startswith(t + ".") for t in taken):
            continue  # inside a list already taken (the root itself may be the list)
        taken.append(name)
        found.extend((f"{name}.{child}" if name else child, m) for child, m in mod.named_children())
    return found


def module_units(model: nn.Module, persistence_threshold: int) -> list[UnitSpec]:
    """Stage 3: one unit per block, one for the root's own parameters, one persistent unit."""
    blocks = block_modules(model)
    owner_of: dict[int, str] = {}
    for bname, block in blocks:
        for p in block.parameters():
            # A parameter reachable from two blocks (tied across blocks) goes to the root,
            # which is gathered around the whole forward.
            owner_of[id(p)] = "" if owner_of.get(id(p), bname) != bname else bname
    # So does one that a module outside every block also uses (an output head tied to a
    # block's weight): a block's unit is released after the block runs.
    block_prefixes = tuple(f"{bname}." for bname, _ in blocks)
    block_names = {bname for bname, _ in blocks}
    for mname, mod in model.named_modules():
        if mname in block_names or mname.startswith(block_prefixes):
            continue
        for p in mod.parameters(recurse=False):
            owner_of[id(p)] = ""
    per_unit: dict[str, list[tuple[str, nn.Parameter]]] = {"": []}
    per_unit.update({bname: [] for bname, _ in blocks})
    persistent: list[tuple[str, nn.Parameter]] = []
    for name, p in named_unique_params(model):
        if p.numel() <= persistence_threshold:
            persistent.append((name, p))
        else:
            per_unit[owner_of.get(id(p), "")].append((name, p))
    modules = {"": model, **dict(blocks)}
    specs = [
        UnitSpec(uname or "root", modules[uname], params, on_demand=True)
        for uname, params in per_unit.items()
        if params
    ]
    if persistent:
        specs.append(UnitSpec("persistent", model, persistent, on_demand=False))
    return specs
