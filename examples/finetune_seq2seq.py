"""Fine-tune an exported seq2seq Performer on a toy task with plain PyTorch (no DeepSpeed).

    python examples/finetune_seq2seq.py --model runs/tiny/export [--task reverse] [--steps 200]

The task: random token sequences in, the same sequence reversed (or copied) out. It only needs
the export's vocabulary, so it runs on any export; the loss falling shows the loaded weights
train. The FAVOR+ features stay exactly as exported (they are fixed), as a fine-tuner wants.
Batches follow the pretraining layout (data/stream.py): inputs end with eos, the decoder starts
with bos and reads the targets shifted right, targets end with eos.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import performer
from performer.optim import weight_decay_groups

# The project's special ids (data/tokenizer.py); the export's tokenizer/tokenizer.json, when it
# has one, is read instead so the example never disagrees with the tokenizer it ships with.
DEFAULT_SPECIAL = {"pad_id": 0, "eos_id": 1, "bos_id": 3}
FIRST_ORDINARY_ID = 5  # ids below are pad, eos, unk, bos, mask


def special_ids(export_dir: Path) -> dict[str, int]:
    info = export_dir / "tokenizer" / "tokenizer.json"
    if info.is_file():
        special = json.loads(info.read_text())["special"]
        return {name: special[name] for name in DEFAULT_SPECIAL}
    return dict(DEFAULT_SPECIAL)


def toy_batch(
    task: str, batch_size: int, length: int, num_symbols: int, special: dict[str, int], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A batch of the toy task. Shapes: input_ids (B, L+1), decoder_input_ids and labels (B, L+1)."""
    tokens = torch.randint(
        FIRST_ORDINARY_ID, FIRST_ORDINARY_ID + num_symbols, (batch_size, length), generator=generator
    )
    eos = torch.full((batch_size, 1), special["eos_id"])
    targets = tokens.flip(1) if task == "reverse" else tokens
    labels = torch.cat([targets, eos], dim=1)
    bos = torch.full((batch_size, 1), special["bos_id"])
    return {
        "input_ids": torch.cat([tokens, eos], dim=1),
        "attention_mask": torch.ones(batch_size, length + 1, dtype=torch.bool),
        "decoder_input_ids": torch.cat([bos, labels[:, :-1]], dim=1),
        "labels": labels,
    }


def finetune(model: torch.nn.Module, args: argparse.Namespace, special: dict[str, int]) -> list[float]:
    """Train ``args.steps`` AdamW steps on the toy task; returns the loss of every step."""
    generator = torch.Generator().manual_seed(args.seed)
    num_symbols = min(args.num_symbols, model.config.vocab_size - FIRST_ORDINARY_ID)
    # Matrices decay; norms, biases and the embedding table do not (performer.optim).
    optimizer = torch.optim.AdamW(weight_decay_groups(model, weight_decay=0.01), lr=args.lr)
    model.train()
    losses = []
    for step in range(1, args.steps + 1):
        batch = toy_batch(args.task, args.batch_size, args.length, num_symbols, special, generator)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    return losses


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="export directory (performer export / save_pretrained)")
    parser.add_argument("--task", choices=("reverse", "copy"), default="reverse")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=8, help="tokens per toy sequence")
    parser.add_argument("--num-symbols", type=int, default=20, help="distinct tokens the sequences use")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)  # dropout, if the export has any
    model = performer.from_pretrained(args.model, dtype=torch.float32)  # train in fp32 whatever was stored
    if model.config.vocab_size <= FIRST_ORDINARY_ID:
        print(f"the export's vocabulary ({model.config.vocab_size}) is too small for the toy task", file=sys.stderr)
        return 2
    losses = finetune(model, args, special_ids(Path(args.model)))
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    print(f"loss {first:.4f} -> {last:.4f} (mean of the first / last 5 steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
