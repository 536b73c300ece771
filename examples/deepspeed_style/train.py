"""A training script written for DeepSpeed. The import line is the only change for zray.

    python -m zray.launch --nproc 2 examples/deepspeed_style/train.py \
        --deepspeed_config examples/deepspeed_style/ds_config.json
(with DeepSpeed: `deepspeed --num_gpus 2 train.py --deepspeed_config ds_config.json` after
`import deepspeed`.)
"""

import argparse

import torch
from torch import nn
from torch.utils.data import Dataset

import zray as deepspeed


class CopyTask(Dataset):
    """Sequences whose second half repeats the first: learnable by a small model."""

    def __init__(self, n: int, half: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        first = torch.randint(vocab, (n, half), generator=g)
        self.seqs = torch.cat([first, first], dim=1)

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> dict:
        s = self.seqs[i]
        return {"input_ids": s[:-1], "labels": s[1:]}


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 64, layers: int = 2, seq: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, seq, d))
        self.layers = nn.ModuleList(Block(d, 4) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids) + self.pos[:, : input_ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x).float()
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--save_dir", type=str, default=None)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = TinyLM()
    dataset = CopyTask(n=640, half=16, vocab=32)
    engine, _, loader, _ = deepspeed.initialize(
        args=args, model=model, model_parameters=model.parameters(), training_data=dataset
    )
    for epoch in range(args.epochs):
        for i, batch in enumerate(loader):
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            loss = engine(**batch)
            engine.backward(loss)
            engine.step()
            if engine.global_rank == 0 and i % 10 == 9:
                print(
                    f"epoch {epoch} step {engine.global_steps} loss {loss.item():.4f} "
                    f"lr {engine.get_lr()[0]:.2e}",
                    flush=True,
                )
    if args.save_dir:
        engine.save_checkpoint(args.save_dir, client_state={"epoch": args.epochs})


if __name__ == "__main__":
    main()
