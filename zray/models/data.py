"""A learnable synthetic language for tests and the CPU demo.

Sequences come from a fixed random first-order Markov chain over the vocabulary: each token
has ``branching`` possible successors with skewed probabilities, so the next token is nearly
determined by the current one. The chain's entropy rate is ~0.91 nats/token against ln(V)
(5.5 for V = 256) for a uniform guess, and a bigram is all a model needs to learn it, so a
small GPT's loss falls clearly within ~100 AdamW steps.
"""

from __future__ import annotations

from typing import Any

import torch

# Successor probabilities, most likely first (entropy 0.91 nats).
_SUCCESSOR_PROBS = (0.7, 0.15, 0.1, 0.05)


def markov_chain(vocab_size: int, chain_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain: successors LongTensor [V, K] and their probabilities FloatTensor [K]."""
    if vocab_size < len(_SUCCESSOR_PROBS):
        raise ValueError(
            f"vocab_size must be at least {len(_SUCCESSOR_PROBS)} for the synthetic chain, "
            f"got {vocab_size}"
        )
    g = torch.Generator().manual_seed(chain_seed)
    k = len(_SUCCESSOR_PROBS)
    # K distinct successors per token in O(V K) memory (a V x V permutation would be 8 GB at
    # V = 32768): a random start plus K strictly increasing offsets, all below V, modulo V.
    start = torch.randint(vocab_size, (vocab_size, 1), generator=g)
    steps = torch.randint(1, max(2, vocab_size // k), (vocab_size, k), generator=g)
    offsets = steps.cumsum(dim=1) - steps[:, :1]  # first offset 0, then increasing, < V
    return (start + offsets) % vocab_size, torch.tensor(_SUCCESSOR_PROBS)


def synthetic_tokens(
    n_samples: int, seq_len: int, vocab_size: int, seed: int, chain_seed: int = 0
) -> torch.Tensor:
    """LongTensor [n_samples, seq_len] of token ids sampled from the Markov chain.

    ``seed`` picks the samples; ``chain_seed`` picks the chain itself, so sets drawn with
    different seeds (train / validation) share one language. Deterministic, on CPU.
    """
    if n_samples <= 0 or seq_len <= 0:
        raise ValueError(
            f"n_samples and seq_len must be positive, got n_samples={n_samples}, seq_len={seq_len}"
        )
    succ, probs = markov_chain(vocab_size, chain_seed)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n_samples, seq_len, dtype=torch.long)
    out[:, 0] = torch.randint(vocab_size, (n_samples,), generator=g)
    # Which successor each step takes: [n_samples, seq_len - 1] indices into K, drawn at once.
    steps = seq_len - 1
    choice = torch.multinomial(probs, max(1, n_samples * steps), replacement=True, generator=g)
    choice = choice[: n_samples * steps].view(n_samples, steps)
    for t in range(steps):  # seq_len small gathers over the batch; cheap next to training
        out[:, t + 1] = succ[out[:, t], choice[:, t]]
    return out


def lm_batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """[B, T] tokens -> the causal-LM batch {input_ids, labels}, labels = input_ids (the model
    shifts them: Hugging Face's convention, see zray.models.gpt). Labels are a copy, so that
    masking some (-100) leaves the inputs as they are."""
    return {"input_ids": tokens, "labels": tokens.clone()}


def synthetic_table(data: Any) -> Any:
    """{"synthetic": {"seq_len", "vocab_size", "n_samples", "seed"}} -> an Arrow table of
    Markov-chain tokens (an input_ids column; the demo and tests); anything else as it is."""
    if not (isinstance(data, dict) and "synthetic" in data):
        return data
    from zray.data.sources import lm_tokens_table

    spec = data["synthetic"]
    tokens = synthetic_tokens(
        int(spec.get("n_samples", 4096)),
        int(spec["seq_len"]),
        int(spec["vocab_size"]),
        seed=int(spec.get("seed", 1)),
    )
    return lm_tokens_table(tokens)
