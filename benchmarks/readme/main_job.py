"""README section "Results: the main job": the loss table of the main job and the figures quoted around it."""

from __future__ import annotations

from benchmarks import common
from benchmarks.readme.core import Block, Figure, Results, kilo, percent


def main_job_table(r: Results) -> str:
    metrics = r["main_job"]["metrics"]
    rows = [
        [step, f"{loss:.2f}", f"{metrics['eval_loss'][step]:.2f}" if step in metrics["eval_loss"] else ""]
        for step, loss in metrics["train_loss"].items()
    ]
    return common.table(["step", "train loss", "eval loss"], rows, align="rrr")


def _main_job_parameters(r: Results) -> int:
    return sum(group["parameters"] for group in r["main_job"]["metrics"]["parameter_groups"].values())


def _main_job(r: Results) -> tuple[str, ...]:
    run, metrics = r["main_job"]["run"], r["main_job"]["metrics"]
    rows = run["train"]["micro_batch_size"] * run["train"]["grad_accum"] * 2  # the README's 2 ranks
    return (
        str(run["zero"]["stage"]),
        str(run["train"]["max_steps"]),
        str(rows),
        f"{metrics['tokens'] / 1e6:.1f}M",
        f"{metrics['training_seconds']:.0f}",
    )


BLOCKS: dict[str, Block] = {
    "main_job": Block(("main_job",), main_job_table),
}


FIGURES: list[Figure] = [
    Figure("`configs/tiny.yaml`, {} parameters", lambda r: f"{_main_job_parameters(r) / 1e6:.2f}M"),
    Figure("ZeRO-{}, {} steps of {} rows, {} tokens, {} s of training", _main_job),
    Figure("trained at commit {})", lambda r: r["main_job"]["trained_at_commit"]),
    Figure("Throughput: {} tokens/s over both ranks", lambda r: kilo(r["main_job"]["metrics"]["tokens_per_s_median"])),
    Figure("data wait {} of step time", lambda r: percent(r["main_job"]["metrics"]["data_wait_fraction_median"], 1)),
    Figure(
        "held-out loss of {} on {} held-out batches of {} rows",
        lambda r: (
            f"{r['main_job']['export']['heldout_loss']:.3f}",
            str(r["main_job"]["export"]["heldout_batches"]),
            str(r["main_job"]["export"]["rows_per_batch"]),
        ),
    ),
    Figure("(commit {}, same seed and data", lambda r: r["main_job-before"]["trained_at_commit"]),
    Figure(
        "(eval losses {} / {} / {} at steps 200 / 400 / 600;",
        lambda r: tuple(f"{r['main_job-before']['metrics']['eval_loss'][s]:.2f}" for s in ("200", "400", "600")),
    ),
    Figure(
        "the export {} held-out, against {} with the draw its last 200 steps trained with",
        lambda r: (
            f"{r['main_job-before']['export']['heldout_loss']:.3f}",
            f"{r['main_job-before']['export']['heldout_loss_by_draw']['400']:.3f}",
        ),
    ),
    Figure(
        "train loss {} at step 10, then {})",
        lambda r: tuple(
            f"{r[name]['metrics']['train_loss']['10']:.2f}" for name in ("main_job-before", "main_job-buffer-order")
        ),
    ),
    Figure(
        "exports its trained draw, {}, the best of the three it drew; fixed FAVOR++ features gave {} on the same "
        "held-out batches (`main_job-buffer-order.md`: the job at commit {}, before",
        lambda r: (
            *(f"{r[name]['export']['heldout_loss']:.3f}" for name in ("main_job-swap200", "main_job-buffer-order")),
            r["main_job-buffer-order"]["trained_at_commit"][:7],
        ),
    ),
]
