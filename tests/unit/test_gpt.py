"""The test / demo / benchmark GPT and its synthetic data."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from zray.models.data import lm_batch, markov_chain, synthetic_tokens
from zray.models.gpt import GPT, GPTConfig, gpt_1b, gpt_6b, gpt_125m, tiny


def test_shapes_and_hf_style_call() -> None:
    cfg = GPTConfig()
    torch.manual_seed(0)
    model = GPT(cfg)
    batch = lm_batch(synthetic_tokens(3, cfg.seq_len, cfg.vocab_size, seed=0))
    assert batch["input_ids"].shape == batch["labels"].shape == (3, cfg.seq_len)
    logits = model(input_ids=batch["input_ids"])
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size)
    loss = model(**batch)
    assert loss.shape == () and loss.dtype == torch.float32
    # Hugging Face's convention: labels = input_ids, shifted inside (logits at t score t + 1).
    want = F.cross_entropy(
        logits[:, :-1].reshape(-1, cfg.vocab_size), batch["input_ids"][:, 1:].reshape(-1)
    )
    torch.testing.assert_close(loss, want)
    # Initial loss ~ ln(V) for small init.
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.2
    # Shorter sequences are fine; -100 labels are ignored.
    labels = batch["labels"][:, :10].clone()
    labels[:, 6:] = -100  # targets of positions 5.. ignored
    short = model(input_ids=batch["input_ids"][:, :10], labels=labels)
    want = F.cross_entropy(
        logits[:, :5].reshape(-1, cfg.vocab_size), batch["input_ids"][:, 1:6].reshape(-1)
    )
    torch.testing.assert_close(short, want)  # causal: positions < 5 ignore the cut


def test_attention_mask_keeps_padding_out() -> None:
    """A padded batch gives each sequence the loss and logits it has alone, with left or right
    padding; an all-ones mask changes nothing."""
    cfg = GPTConfig()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    ids = synthetic_tokens(2, 12, cfg.vocab_size, seed=4)
    alone = [model(input_ids=ids[i : i + 1, :n]) for i, n in enumerate((12, 7))]
    want_loss = [model(input_ids=ids[i : i + 1, :n], labels=ids[i : i + 1, :n]) for i, n in
                 enumerate((12, 7))]  # fmt: skip
    for left in (False, True):
        mask = torch.ones(2, 12, dtype=torch.long)
        padded = ids.clone()
        pad = slice(0, 5) if left else slice(7, 12)
        mask[1, pad], padded[1, pad] = 0, 0
        labels = padded.masked_fill(mask == 0, -100)
        logits = model(input_ids=padded, attention_mask=mask)
        torch.testing.assert_close(logits[0], alone[0][0])
        if not left:  # positions are absolute: the right-padded row matches the short one
            torch.testing.assert_close(logits[1, :7], alone[1][0])
        assert torch.isfinite(logits).all()  # a padded query with no token before it too
        if not left:
            loss = model(input_ids=padded[1:], labels=labels[1:], attention_mask=mask[1:])
            torch.testing.assert_close(loss, want_loss[1])
        # Padding's values do not reach any token.
        other = padded.clone()
        other[1, pad] = 17
        torch.testing.assert_close(
            model(input_ids=other, attention_mask=mask)[1][mask[1] == 1],
            logits[1][mask[1] == 1],
        )
    ones = torch.ones(2, 12, dtype=torch.long)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=ones), model(input_ids=ids))
    with pytest.raises(ValueError, match=r"attention_mask has shape \[2, 11\]; allowed: \[B, 12\]"):
        model(input_ids=ids, attention_mask=ones[:, :11])


def test_too_long_input_error() -> None:
    model = GPT(GPTConfig(seq_len=8))
    with pytest.raises(ValueError, match=r"sequence length 9.*seq_len 8"):
        model(input_ids=torch.zeros(1, 9, dtype=torch.long))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"d_model \(65\).*n_head \(2\)"):
        GPTConfig(d_model=65)
    with pytest.raises(ValueError, match=r"n_layer must be a positive int, got 0"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig.tiny().with_(dropout=1.0)


def test_deterministic_init() -> None:
    torch.manual_seed(3)
    a = GPT(GPTConfig())
    torch.manual_seed(3)
    b = GPT(GPTConfig())
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    block = a.blocks[0]
    assert torch.count_nonzero(block.attn.qkv.bias) == 0
    assert torch.all(block.ln1.weight == 1)
    # Residual projections are scaled down by sqrt(2 * n_layer) = 2.
    big = GPT(GPTConfig(d_model=256, n_head=4))
    assert big.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_tied_embeddings_share_one_parameter() -> None:
    cfg = GPTConfig(tie_embeddings=True)
    model = GPT(cfg)
    assert model.lm_head.weight is model.tok_emb.weight
    assert sum(p is model.tok_emb.weight for p in model.parameters()) == 1
    untied = GPT(GPTConfig())
    assert model.num_params() == untied.num_params() - cfg.vocab_size * cfg.d_model
    # Both uses contribute to the one gradient.
    model(**lm_batch(synthetic_tokens(2, cfg.seq_len, cfg.vocab_size, seed=0))).backward()
    assert model.tok_emb.weight.grad is not None


def test_num_params_hand_count() -> None:
    V, T, L, D = 10, 6, 2, 8
    cfg = GPTConfig(vocab_size=V, seq_len=T, n_layer=L, n_head=2, d_model=D)
    per_block = (
        2 * D  # ln1 weight + bias
        + (D * 3 * D + 3 * D)  # attn.qkv
        + (D * D + D)  # attn.proj
        + 2 * D  # ln2
        + (D * 4 * D + 4 * D)  # mlp.fc
        + (4 * D * D + D)  # mlp.proj
    )
    embeddings = V * D + T * D
    head = V * D  # lm_head: no bias
    total = embeddings + L * per_block + 2 * D + head
    model = GPT(cfg)
    assert model.num_params() == total == 1968
    assert model.num_params(exclude_embeddings=True) == total - embeddings
    tied = GPT(cfg.with_(tie_embeddings=True))
    # Tied: the token table is also the output projection, so it stays counted (once).
    assert tied.num_params() == total - head
    assert tied.num_params(exclude_embeddings=True) == total - head - T * D
    nobias = GPT(cfg.with_(bias=False))
    # Biases gone: ln1, ln2 (2D), qkv (3D), attn.proj (D), fc (4D), mlp.proj (D); ln_f (D).
    assert nobias.num_params() == total - L * (2 * D + 3 * D + D + 4 * D + D) - D


def test_flops_per_token() -> None:
    cfg = GPTConfig(vocab_size=10, seq_len=6, n_layer=2, n_head=2, d_model=8)
    model = GPT(cfg)
    n = model.num_params(exclude_embeddings=True)
    assert model.flops_per_token() == 6 * n + 12 * 2 * 8 * 6


def test_named_sizes() -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        sizes = {f.__name__: GPT(f()).num_params() for f in (tiny, gpt_125m, gpt_1b, gpt_6b)}
    assert 0.5e6 < sizes["tiny"] < 1.5e6
    assert 120e6 < sizes["gpt_125m"] < 130e6
    assert 1.1e9 < sizes["gpt_1b"] < 1.3e9
    assert 5.5e9 < sizes["gpt_6b"] < 6.5e9
    cfg = gpt_1b()
    assert (cfg.d_model, cfg.n_layer, cfg.n_head, cfg.seq_len, cfg.vocab_size) == (
        2048, 24, 16, 2048, 32768,
    )  # fmt: skip
    assert GPTConfig.tiny() == tiny()


def test_synthetic_tokens() -> None:
    a = synthetic_tokens(8, 20, 50, seed=0)
    assert a.shape == (8, 20) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < 50
    assert torch.equal(a, synthetic_tokens(8, 20, 50, seed=0))
    b = synthetic_tokens(8, 20, 50, seed=1)
    assert not torch.equal(a, b)
    # Every transition is one of the chain's successors, whatever the sample seed.
    succ, _ = markov_chain(50)
    for tokens in (a, b):
        prev, nxt = tokens[:, :-1].reshape(-1), tokens[:, 1:].reshape(-1)
        assert bool((succ[prev] == nxt[:, None]).any(dim=1).all())
    batch = lm_batch(a)
    assert torch.equal(batch["input_ids"], a) and torch.equal(batch["labels"], a)


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Intra-op threads buy nothing on a model this small, and on a shared 2-core CI machine
    # OpenMP's spinning threads made this test ~5x slower (33 s against 6 s) when other
    # processes were busy.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.usefixtures("one_thread")
def test_tiny_loss_falls_in_100_steps() -> None:
    torch.manual_seed(0)
    cfg = tiny()
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = synthetic_tokens(256, cfg.seq_len, cfg.vocab_size, seed=0)
    held_out = lm_batch(synthetic_tokens(32, cfg.seq_len, cfg.vocab_size, seed=1))
    with torch.no_grad():
        before = model(**held_out).item()
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(data), (8,), generator=gen)
        loss = model(**lm_batch(data[idx]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = model(**held_out).item()
    # From ln(256) = 5.5 towards the chain's entropy rate of ~0.91 nats.
    assert before > 5.0
    assert after < 2.0, (before, after)
