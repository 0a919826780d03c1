"""Checkpoints at size: what a save costs the step loop, what hashing adds, and what a resume takes.

    python benchmarks/checkpoint_io.py [--sizes 100,1000,4000] [--stages 2,3] [--repeats 3]

2 CPU ranks under the deepspeed launcher, each (checkpoint size, ZeRO stage) in one job: the
trainer's own engine (`launcher.engine.build_engine`, fp32 AdamW as configs/tiny.yaml trains)
over a seq2seq model whose width is chosen so that its checkpoint (fp32 weights + AdamW's master
copy and two moments: ~16 bytes per parameter) is about --sizes MB; one optimizer step so every
state exists. Then, each timed between barriers (the slowest rank), after one untimed save,
--repeats times, each variant first in turn:

* ds_write: DeepSpeed's own write (`engine.save_checkpoint`, its plain torch writer), the floor;
* read_back: `launcher.checkpoint.save` as before this change: DeepSpeed's write, then every file
  read back and hashed (dealt round-robin over the ranks), then rank 0's commit (the COMPLETE
  marker and pointer, each fsynced, and the retention of older tags) before the step loop goes on;
* hashed_writes: each file hashed (XXH3-128) while DeepSpeed writes it (launcher/hashed_writes.py),
  the commit still in the step loop;
* background_commit: what the trainer does now at a periodic save: hashed while written, rank 0
  commits on a thread; timed until the step loop goes on, the commit's own time apart (commit_s,
  waited for by `finish_commit` before the next save);
* resume: `--resume auto` on the last tag: verification (every file read back and hashed against
  the marker) and DeepSpeed's load, timed apart.

Each measurement starts after a sync (nothing waiting to be written back); the files then go to
the page cache of this machine's disk (DeepSpeed does not fsync; the commit's fsync of the marker
makes the filesystem write the checkpoint out). A parallel filesystem is slower to write and to
read back. Writes benchmarks/results/checkpoint_io.json,
checkpoint_io.md and checkpoint_io.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "checkpoint_io"
VOCAB = 8000
BYTES_PER_PARAMETER = 16  # fp32 weights (model states file) + fp32 master, exp_avg, exp_avg_sq (optimizer files)
VARIANTS = ("ds_write", "read_back", "hashed_writes", "background_commit")


def model_settings(megabytes: int) -> list[str]:
    """A seq2seq model of ~megabytes of checkpoint: width grows with the size, 4 + 4 layers (8 + 8 from 1 GB)."""
    parameters = megabytes * 1e6 / BYTES_PER_PARAMETER
    layers = 4 if megabytes < 1000 else 8
    # encoder layer ~12 d^2, decoder layer ~16 d^2 (cross-attention), embeddings vocab x d
    per_width = 28 * layers
    d_model = (-VOCAB + (VOCAB**2 + 4 * per_width * parameters) ** 0.5) / (2 * per_width)
    d_model = max(64, int(round(d_model / 64)) * 64)
    return [
        f"model.d_model={d_model}",
        f"model.num_heads={max(1, d_model // 64)}",
        f"model.num_encoder_layers={layers}",
        f"model.num_decoder_layers={layers}",
    ]


# ----------------------------------------------------------------------------- worker (each rank)


def _timed(fn) -> float:
    import torch.distributed as dist

    os.sync()  # every measurement starts with nothing waiting to be written back
    dist.barrier()
    started = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - started


def worker(args) -> None:
    import torch

    from data.tokenizer import SpecialTokens
    from launcher import checkpoint
    from launcher.config import load_config
    from launcher.dist import init_distributed
    from launcher.engine import build_engine, build_model_config
    from launcher.hashed_writes import HashingCheckpointEngine
    from performer.models import build_model

    topology = init_distributed(600.0)
    config = load_config(
        [ROOT / "configs" / "tiny.yaml"],
        [
            *model_settings(args.megabytes),
            f"zero.stage={args.stage}",
            "zero.bucket_elements=20000000",
            "train.micro_batch_size=1",
            f"train.output_dir={args.directory}",
        ],
    )
    special = SpecialTokens(vocab_size=VOCAB, num_sentinels=100)
    torch.manual_seed(0)
    model = build_model("seq2seq", build_model_config(config, special))
    parameters = sum(p.numel() for p in model.parameters())
    engine, _ = build_engine(config, model, topology.world_size)
    batch = {
        "input_ids": torch.randint(5, VOCAB - 200, (1, 16)),
        "decoder_input_ids": torch.randint(5, VOCAB - 200, (1, 8)),
        "labels": torch.randint(5, VOCAB - 200, (1, 8)),
    }
    engine.backward(engine(**batch).loss)
    engine.step()

    hashing = engine.checkpoint_engine
    assert isinstance(hashing, HashingCheckpointEngine)
    plain = hashing._inner
    directory = Path(args.directory) / "checkpoints"
    client_state = {"model_config": model.config.to_dict()}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    step = 0

    commit_seconds: list[float] = []

    def save(variant: str) -> None:
        nonlocal step
        step += 1
        engine.checkpoint_engine = plain if variant in ("ds_write", "read_back") else hashing
        if variant == "ds_write":
            engine.save_checkpoint(str(directory), tag=checkpoint.tag_for_step(step), save_latest=False)
        else:
            background = variant == "background_commit"
            checkpoint.save(engine, directory, step, client_state, topology, 1, config, background=background)

    def drop_ds_tag() -> None:  # not a complete tag: never resumed from
        if topology.is_main:
            shutil.rmtree(directory / checkpoint.tag_for_step(step))

    save("ds_write")  # untimed: the first save of a process pays for directories and allocations
    drop_ds_tag()
    for repeat in range(args.repeats):
        turn = repeat % len(VARIANTS)
        for variant in VARIANTS[turn:] + VARIANTS[:turn]:  # each variant first in turn
            times[variant].append(_timed(lambda: save(variant)))
            if variant == "ds_write":
                drop_ds_tag()
            if variant == "background_commit":
                commit_seconds.append(_timed(lambda: checkpoint.finish_commit(directory, topology)))
    engine.checkpoint_engine = hashing
    tag = checkpoint.complete_tags(directory)[-1]
    checkpoint_bytes = sum(p.stat().st_size for p in (directory / tag).rglob("*") if p.is_file())
    found: list[str] = []
    verify_s = _timed(lambda: found.append(checkpoint.resolve_resume_tag(directory, "auto", topology)))
    load_s = _timed(lambda: checkpoint.load(engine, directory, found[0]))
    if topology.is_main:
        record = {
            "megabytes": args.megabytes,
            "stage": args.stage,
            "parameters": parameters,
            "checkpoint_bytes": checkpoint_bytes,
            "files": len([p for p in (directory / tag).rglob("*") if p.is_file()]),
            "seconds": times,
            "median_s": {variant: statistics.median(values) for variant, values in times.items()},
            "commit_s": statistics.median(commit_seconds),
            "resume_verify_s": verify_s,
            "resume_load_s": load_s,
        }
        Path(args.out).write_text(json.dumps(record))
        shutil.rmtree(directory, ignore_errors=True)
    torch.distributed.barrier()


# ----------------------------------------------------------------------------- driver


def run_job(megabytes: int, stage: int, repeats: int, scratch: Path, timeout_s: float) -> dict:
    out = scratch / f"record-{megabytes}-{stage}.json"
    command = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(common.free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        "--megabytes",
        str(megabytes),
        "--stage",
        str(stage),
        "--repeats",
        str(repeats),
        "--directory",
        str(scratch / f"run-{megabytes}-{stage}"),
        "--out",
        str(out),
    ]
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    environment.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"megabytes": megabytes, "stage": stage, "error": f"over the {timeout_s:.0f} s limit"}
    finally:
        shutil.rmtree(scratch / f"run-{megabytes}-{stage}", ignore_errors=True)
    if done.returncode != 0 or not out.is_file():
        return {"megabytes": megabytes, "stage": stage, "error": f"exit {done.returncode}", "tail": done.stderr[-800:]}
    return json.loads(out.read_text())


def overhead(record: dict, variant: str) -> float:
    """The save's cost to the step loop over DeepSpeed's own write."""
    median = record["median_s"]
    return median[variant] / median["ds_write"] - 1


def table(results: dict) -> str:
    rows = []
    for r in results["records"]:
        if "error" in r:
            rows.append([f"{r['megabytes']:,} MB", f"ZeRO-{r['stage']}", r["error"], "", "", "", "", ""])
            continue
        median = r["median_s"]
        rows.append(
            [
                f"{r['checkpoint_bytes'] / 1e6:,.0f} MB ({r['parameters'] / 1e6:,.0f}M params)",
                f"ZeRO-{r['stage']}",
                common.seconds(median["ds_write"]),
                *(
                    f"{common.seconds(median[variant])} ({overhead(r, variant) * 100:+.0f}%)"
                    for variant in ("read_back", "hashed_writes", "background_commit")
                ),
                common.seconds(r["commit_s"]),
                f"{common.seconds(r['resume_verify_s'])} + {common.seconds(r['resume_load_s'])}",
            ]
        )
    header = ["checkpoint", "stage", "DeepSpeed write", "save before: read back", "hashed while written"]
    header += ["+ commit in background (now)", "the commit, behind", "resume: verify + load"]
    settings = results["settings"]
    return (
        f"2 CPU ranks, fp32 AdamW; medians of {settings['repeats']} saves each, the slowest rank, into the page "
        "cache; what the step loop waits for, in brackets over DeepSpeed's own write:\n\n"
        + common.table(header, rows, "llrrrrrr")
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in results["records"] if "error" not in r]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, stage in zip(axes, (2, 3)):
        mine = sorted((r for r in records if r["stage"] == stage), key=lambda r: r["checkpoint_bytes"])
        sizes = [r["checkpoint_bytes"] / 1e9 for r in mine]
        for variant, label in (
            ("ds_write", "DeepSpeed write"),
            ("read_back", "save before (read back)"),
            ("hashed_writes", "hashed while written"),
            ("background_commit", "+ commit in background (now)"),
        ):
            axis.plot(sizes, [r["median_s"][variant] for r in mine], marker="o", label=label)
        axis.plot(sizes, [r["resume_verify_s"] + r["resume_load_s"] for r in mine], marker="s", label="resume")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("checkpoint (GB)")
        axis.set_title(f"ZeRO-{stage}, 2 CPU ranks")
    axes[0].set_ylabel("seconds")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,4000", help="checkpoint sizes in MB")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per job")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--megabytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = parser.parse_args()
    if args.worker:
        worker(args)
        from launcher.pretrain import exit_without_teardown

        exit_without_teardown(0)
    scratch = ROOT / "runs" / "bench-checkpoint-io"
    scratch.mkdir(parents=True, exist_ok=True)
    records = []
    for megabytes in (int(size) for size in args.sizes.split(",")):
        for stage in (int(stage) for stage in args.stages.split(",")):
            record = run_job(megabytes, stage, args.repeats, scratch, args.timeout)
            print(json.dumps({k: v for k, v in record.items() if k != "seconds"}), flush=True)
            records.append(record)
    results = {
        "machine": common.machine(),
        "settings": {"sizes_mb": args.sizes, "stages": args.stages, "repeats": args.repeats},
        "records": records,
    }
    common.publish(NAME, results, "# Checkpoints at size\n\n" + table(results), plot)


if __name__ == "__main__":
    main()
