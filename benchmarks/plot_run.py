"""Plot a run's loss curves from its TensorBoard event files.

    python benchmarks/plot_run.py runs/tiny --out docs/results/tiny-loss.png

Reads train/loss and eval/loss with TensorBoard's own event reader (the same files TensorBoard
shows) and writes a PNG. Needs matplotlib (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def read_scalars(run_dir: Path, tags: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    available = set(accumulator.Tags()["scalars"])
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in tags if tag in available}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(args.run_dir, ("train/loss", "eval/loss"))
    if "train/loss" not in scalars:
        print(f"no train/loss scalars under {args.run_dir / 'tensorboard'}", file=sys.stderr)
        return 2
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for tag, style in (("train/loss", "-"), ("eval/loss", "o-")):
        if tag in scalars:
            steps, values = zip(*scalars[tag])
            axis.plot(steps, values, style, label=tag)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.set_title(args.title or f"{args.run_dir.name}: loss")
    axis.grid(alpha=0.3)
    axis.legend()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
