"""Hugging Face's causal-LM data convention (zray.data.collate): input_ids alone trains a
causal LM, padding is kept out of the loss, and nothing is added where it does not belong."""

from __future__ import annotations

import pyarrow as pa
import torch
from torch import nn

from zray.data import GlobalBatchSampler, RankBatches, as_source, lm_tokens_table
from zray.data.collate import causal_lm_batch, collate_for, is_causal_lm
from zray.models.data import synthetic_tokens
from zray.models.gpt import GPT, GPTConfig


class LlamaForCausalLM(nn.Module):  # named as Hugging Face names its causal-LM heads
    def forward(self, input_ids=None, attention_mask=None, labels=None):  # noqa: ANN001, ANN201
        return input_ids


class BertForSequenceClassification(nn.Module):
    def forward(self, input_ids=None, attention_mask=None, labels=None):  # noqa: ANN001, ANN201
        return input_ids


class NoLabels(nn.Module):
    causal_lm = True

    def forward(self, input_ids):  # noqa: ANN001, ANN201
        return input_ids


def test_which_models_are_causal_lms() -> None:
    assert is_causal_lm(GPT(GPTConfig()))
    assert is_causal_lm(LlamaForCausalLM())
    assert not is_causal_lm(BertForSequenceClassification())
    assert not is_causal_lm(nn.Linear(2, 2))


def test_collate_only_where_labels_are_missing_or_a_mask_is_given() -> None:
    gpt = GPT(GPTConfig())
    assert collate_for(gpt, ["input_ids"]) is not None
    assert collate_for(gpt, ["input_ids", "labels"]) is None  # the user's labels, untouched
    assert collate_for(gpt, ["input_ids", "labels", "attention_mask"]) is not None
    assert collate_for(gpt, ["tokens"]) is None
    assert collate_for(BertForSequenceClassification(), ["input_ids"]) is None
    assert collate_for(NoLabels(), ["input_ids"]) is None  # its forward takes no labels
    assert collate_for(LlamaForCausalLM(), ["input_ids"]) is not None


def test_labels_are_the_ids_with_padding_ignored() -> None:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    out = causal_lm_batch({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(out["labels"], torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]]))
    assert torch.equal(out["attention_mask"], mask) and torch.equal(out["input_ids"], ids)
    plain = causal_lm_batch({"input_ids": ids})
    assert list(plain) == ["input_ids", "labels"] and torch.equal(plain["labels"], ids)
    # A mask that masks nothing is dropped (the causal-only attention kernel is faster).
    full = causal_lm_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert list(full) == ["input_ids", "labels"]
    # The user's own labels stay as given.
    mine = torch.full_like(ids, 3)
    kept = causal_lm_batch({"input_ids": ids, "labels": mine, "attention_mask": mask}, False)
    assert kept["labels"] is mine


def test_input_ids_alone_give_the_loss_of_explicit_labels() -> None:
    """From a table with one input_ids column, RankBatches + collate hand the GPT a batch whose
    loss equals model(input_ids, labels=input_ids): the convention end to end, on CPU."""
    cfg = GPTConfig()
    torch.manual_seed(0)
    model = GPT(cfg)
    tokens = synthetic_tokens(16, cfg.seq_len, cfg.vocab_size, seed=2)
    source = as_source(lm_tokens_table(tokens))
    sampler = GlobalBatchSampler(len(source), 4, seed=0)
    collate = collate_for(model, source.columns)
    rb = RankBatches(source, sampler, 0, 1, 4, 1, "cpu", collate)
    batch = next(rb)
    assert sorted(batch) == ["input_ids", "labels"]
    rows = torch.from_numpy(GlobalBatchSampler(len(source), 4, seed=0).next_global_batch())
    want = model(input_ids=tokens[rows], labels=tokens[rows])
    torch.testing.assert_close(model(**batch), want, rtol=0, atol=0)


def test_padded_rows_from_a_table() -> None:
    """A padded Parquet-style table (input_ids + attention_mask): labels derived with -100 on
    padding, and the loss equals that of the unpadded rows' tokens."""
    cfg = GPTConfig()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    tokens = synthetic_tokens(2, 10, cfg.vocab_size, seed=5)
    ids = tokens.clone()
    ids[1, 6:] = 0
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    table = pa.table({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    source = as_source(table)
    batch = collate_for(model, source.columns)(source.take([0, 1]))
    assert batch["labels"][1, 6:].eq(-100).all() and batch["labels"][0].eq(tokens[0]).all()
    loss = model(**batch)
    # Reference: the mean over both rows' predicted positions (9 + 5), each row alone.
    full = model(input_ids=tokens[:1], labels=tokens[:1]) * 9
    short = model(input_ids=tokens[1:, :6], labels=tokens[1:, :6]) * 5
    torch.testing.assert_close(loss, (full + short) / 14)
