"""Hugging Face's causal-LM data convention: `input_ids` alone is enough.

A causal language model called as ``model(input_ids=..., labels=...)`` shifts its labels inside
(Hugging Face's ``*ForCausalLM``, zray's GPT): labels are the token ids themselves. So data with
no ``labels`` column gets ``labels = input_ids``, with padded positions (``attention_mask`` 0)
set to -100, the ignored index, as Hugging Face's DataCollatorForLanguageModeling does for
padding. An ``attention_mask`` of all ones is dropped from the batch: it masks nothing, and
without it attention takes its fastest, causal-only kernel.

Runs on the data thread, on CPU tensors, before the batch is pinned and copied to the device.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["IGNORE_INDEX", "Collate", "causal_lm_batch", "collate_for", "is_causal_lm"]

IGNORE_INDEX = -100  # positions the loss skips (torch's and Hugging Face's convention)

Collate = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

# Hugging Face's causal-LM heads: LlamaForCausalLM, MistralForCausalLM, ..., GPT2LMHeadModel.
_HF_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model(input_ids, labels=input_ids)`` is next-token training: a class that says
    so (``causal_lm = True``, zray's GPT) or a Hugging Face causal-LM head, by its class name."""
    cls = type(model)
    return getattr(cls, "causal_lm", False) is True or cls.__name__.endswith(_HF_CAUSAL_SUFFIXES)


def collate_for(model: nn.Module, columns: Sequence[str]) -> Collate | None:
    """The transform the data layer applies to each batch for this model and data, or None
    (batches go as they are): only for a causal LM, with `input_ids`. Data without labels acts
    as data with ``labels = input_ids`` in every respect, a `loss=fn(outputs, batch)` given to
    fit included (it sees the model's outputs with labels, and the batch with them)."""
    if "input_ids" not in columns or not is_causal_lm(model):
        return None
    takes = inspect.signature(model.forward).parameters
    add_labels = "labels" not in columns and "labels" in takes
    if not add_labels and "attention_mask" not in columns:
        return None
    return functools.partial(causal_lm_batch, add_labels=add_labels)


def causal_lm_batch(
    batch: dict[str, torch.Tensor], add_labels: bool = True
) -> dict[str, torch.Tensor]:
    """``batch`` with ``labels`` derived from ``input_ids`` (padding -100) when asked, and an
    all-ones ``attention_mask`` dropped (see the module note)."""
    out = dict(batch)
    ids, mask = batch["input_ids"], batch.get("attention_mask")
    if add_labels:
        out["labels"] = ids if mask is None else ids.masked_fill(mask == 0, IGNORE_INDEX)
    if mask is not None and bool((mask != 0).all()):
        del out["attention_mask"]
    return out
