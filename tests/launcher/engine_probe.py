"""Probe the trainer's real DeepSpeed engine: which parameters decay and at what rate each step runs.

    deepspeed --num_gpus 2 tests/launcher/engine_probe.py OUT.json

For each ZeRO setting, the engine is built by the trainer's own ``build_engine`` and stepped with
the trainer's schedule on a loss multiplied by 0. With zero gradients AdamW's update is exactly 0,
so the only change a step makes is decoupled weight decay, w <- w x (1 - lr x weight_decay): which
parameters moved says which decay, and by how much says the rate the step really used. Rank 0
writes, per setting, the names that moved, the names that did not, and each step's rate measured
that way. Then each setting saves a checkpoint: which of its files were hashed as DeepSpeed wrote
them (launcher/hashed_writes.py) and whether those digests equal the files read back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {
    "zero0": ["zero.stage=0"],
    "zero1": ["zero.stage=1"],
    "zero2-offload": ["zero.stage=2", "zero.offload=optimizer"],
    "zero3": ["zero.stage=3"],
}
COMMON = [
    "model.d_model=32",
    "optimizer.weight_decay=0.1",
    "optimizer.lr=0.01",
    "schedule.warmup_steps=3",
    "schedule.min_lr_ratio=0.1",
    "train.max_steps=6",
    "train.micro_batch_size=2",
    "log.progress=false",
]
WEIGHT_DECAY, STEPS = 0.1, 6


def full_parameters(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    parameters = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(parameters.values()), enabled=engine.zero_optimization_stage() == 3):
        return {name: p.detach().float().clone() for name, p in parameters.items()}


def probe(name: str, overrides: list[str], world_size: int, checkpoints: Path) -> dict:
    from data.tokenizer import SpecialTokens
    from launcher.config import load_config
    from launcher.engine import build_engine, build_model_config
    from launcher.schedule import learning_rate, set_learning_rate
    from performer.models import build_model

    config = load_config([REPO / "configs" / "tiny.yaml"], [*COMMON, *overrides])
    special = SpecialTokens(vocab_size=300, num_sentinels=20)
    torch.manual_seed(0)
    model = build_model("seq2seq", build_model_config(config, special))
    engine, groups = build_engine(config, model, world_size)
    generator = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(5, 280, (2, 16), generator=generator),
        "decoder_input_ids": torch.randint(5, 280, (2, 8), generator=generator),
        "labels": torch.randint(5, 280, (2, 8), generator=generator),
    }
    before = full_parameters(engine)
    moved: set[str] = set()
    measured_rates = []
    for step in range(1, STEPS + 1):
        loss = engine(**batch).loss * 0.0
        engine.backward(loss)
        set_learning_rate(
            engine.optimizer,
            learning_rate(
                step,
                config.optimizer.lr,
                config.schedule.warmup_steps,
                config.train.max_steps,
                config.schedule.min_lr_ratio,
            ),
        )
        engine.step()
        after = full_parameters(engine)
        shrink = []
        for parameter, value in after.items():
            if not torch.equal(value, before[parameter]):
                moved.add(parameter)
                mask = before[parameter].abs() > 1e-3
                shrink.append((1 - value[mask] / before[parameter][mask]).median().item())
        measured_rates.append(sum(shrink) / len(shrink) / WEIGHT_DECAY if shrink else 0.0)
        before = after
    result = {"moved": sorted(moved), "still": sorted(set(before) - moved), "rates": measured_rates, "groups": groups}
    return {**result, **saved_digests(engine, checkpoints / name)}


def saved_digests(engine, directory: Path) -> dict:
    """Save a checkpoint; the files hashed while written (by any rank), the others, and any whose
    written digest differs from the file read back."""
    from launcher.checkpoint import _file_digest, _tag_files
    from launcher.hashed_writes import take_written_digests

    engine.save_checkpoint(str(directory), tag="probe", save_latest=False)
    shares = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(shares, take_written_digests(engine, directory / "probe"))
    written = {name: digest for share in shares for name, digest in share.items()}
    files = _tag_files(directory / "probe")
    return {
        "hashed_while_written": sorted(written),
        "read_back": sorted(set(files) - set(written)),
        "digests_differing": sorted(n for n, d in written.items() if _file_digest(directory / "probe" / n) != d),
    }


def main() -> int:
    from launcher.dist import init_distributed

    topology = init_distributed(60.0)
    checkpoints = Path(sys.argv[-1]).parent / "checkpoints"
    results = {name: probe(name, overrides, topology.world_size, checkpoints) for name, overrides in SETTINGS.items()}
    if topology.is_main:
        Path(sys.argv[-1]).write_text(json.dumps(results, indent=1))
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    code = main()
    from launcher.pretrain import exit_without_teardown

    exit_without_teardown(code)
