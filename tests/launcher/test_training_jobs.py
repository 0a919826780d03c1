"""The trainer on real DeepSpeed engines, 2 CPU ranks (gloo), test-sized model and data."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from jobs import REPO, run_pretrain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(prepared_data, tmp_path_factory):
    """Runs shared by several tests, each made once: runs[name] with the settings below."""
    settings = {
        "zero0": ["zero.stage=0"],
        "zero1": ["zero.stage=1"],
        "zero2": ["zero.stage=2"],
        "zero3": ["zero.stage=3", "model.feature_redraw_interval=2"],
    }
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_pretrain(prepared_data, tmp_path_factory.mktemp(name) / "run", *settings[name])
            assert cache[name].returncode == 0, cache[name].output[-4000:]
        return cache[name]

    return get


def _mean(values):
    return sum(values) / len(values)


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_every_zero_stage_trains_and_the_loss_falls(runs, name):
    run = runs(name)
    losses = run.losses()
    assert sorted(losses) == list(range(1, 9))
    assert all(math.isfinite(loss) for loss in losses.values())
    assert _mean([losses[7], losses[8]]) < _mean([losses[1], losses[2]]) - 0.5
    evals = {r["step"]: r["loss"] for r in run.records("eval")}
    assert sorted(evals) == [4, 8] and evals[8] < evals[4]
    train = run.records("train")[-1]
    assert {"loss", "lr", "tokens_per_s", "grad_norm", "mfu", "data_wait_fraction", "skipped_steps"} <= set(train)
    assert train["tokens_per_s"] > 0 and train["skipped_steps"] == 0
    # The logged rate is the one the step used: warmup 2 at 3e-3, cosine to 3e-4 at step 8.
    from launcher.schedule import learning_rate

    logged = {r["step"]: r["lr"] for r in run.records("train")}
    assert logged[1] == pytest.approx(1.5e-3) and logged[2] == pytest.approx(3e-3) and logged[8] == pytest.approx(3e-4)
    assert logged == {step: pytest.approx(learning_rate(step, 3e-3, 2, 8, 0.1)) for step in range(1, 9)}
    checkpoints = run.directory / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step00000008"
    assert all((checkpoints / tag / "COMPLETE").is_file() for tag in ("step00000004", "step00000008"))


def test_tensorboard_event_files_hold_the_training_loss(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(runs("zero1").directory / "tensorboard"))
    accumulator.Reload()
    steps = [event.step for event in accumulator.Scalars("train/loss")]
    assert steps == list(range(1, 9))
    assert {"train/lr", "eval/loss", "eval/perplexity", "train/tokens_per_s"} <= set(accumulator.Tags()["scalars"])


def test_redraws_under_zero3_are_bitwise_equal_across_ranks(runs):
    from launcher.projections import projection_digest
    from performer.config import ModelConfig
    from performer.feature_maps import derive_seed
    from performer.models import PerformerSeq2Seq

    run = runs("zero3")
    redraws = [r for r in run.records("event") if "redraw" in r]
    # After steps 2, 4 and 6, each for the steps after it; none after the last step (8).
    assert [(r["redraw"], r["first_step"]) for r in redraws] == [(2, 3), (4, 5), (6, 7)]
    # The trainer all-gathers each rank's digest at every redraw and fails on a mismatch; here the
    # digests must also equal what any process computes from (base seed, step) alone.
    model = PerformerSeq2Seq(ModelConfig.from_dict(json.loads((run.directory / "model_config.json").read_text())))
    for record in redraws:
        model.redraw_projection_matrices_(seed=derive_seed(0, 0x5EED), step=record["redraw"])
        assert record["projection_digest"] == projection_digest(model)


def test_bf16_trains_under_zero2(prepared_data, tmp_path):
    run = run_pretrain(prepared_data, tmp_path / "run", "zero.stage=2", "precision=bf16")
    assert run.returncode == 0, run.output[-4000:]
    losses = run.losses()
    assert all(math.isfinite(loss) for loss in losses.values())
    assert _mean([losses[7], losses[8]]) < _mean([losses[1], losses[2]]) - 0.5


def test_activation_checkpointing_gives_the_same_losses_under_zero3(prepared_data, tmp_path):
    common = ["zero.stage=3", "train.max_steps=3", "checkpoint.interval=3", "eval.interval=0"]
    plain = run_pretrain(prepared_data, tmp_path / "plain", *common)
    recomputed = run_pretrain(prepared_data, tmp_path / "ckpt", *common, "model.gradient_checkpointing=1")
    assert plain.returncode == 0 and recomputed.returncode == 0, (plain.output + recomputed.output)[-4000:]
    for a, b in zip(plain.records("train"), recomputed.records("train")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_resume_reproduces_the_uninterrupted_run_bitwise(runs, prepared_data, tmp_path):
    reference = runs("zero1")
    interrupted = tmp_path / "run"
    first = run_pretrain(prepared_data, interrupted, "zero.stage=1", "train.max_steps=8", "checkpoint.interval=4")
    assert first.returncode == 0, first.output[-4000:]
    # As if killed after step 4's checkpoint: the later checkpoint and records are gone.
    import shutil

    shutil.rmtree(interrupted / "checkpoints" / "step00000008")
    (interrupted / "metrics.jsonl").unlink()
    resumed = run_pretrain(prepared_data, interrupted, "zero.stage=1", resume="auto")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from step00000004 at step 4" in resumed.output
    expected = {step: loss for step, loss in reference.losses().items() if step > 4}
    assert resumed.losses() == expected  # bitwise: CPU fp32, same data cursor, same RNG


def test_a_corrupted_checkpoint_is_skipped_for_the_previous_one(runs, prepared_data, tmp_path):
    import shutil

    reference = runs("zero1")
    directory = tmp_path / "run"
    shutil.copytree(reference.directory, directory)
    (directory / "metrics.jsonl").unlink()
    damaged = directory / "checkpoints" / "step00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    resumed = run_pretrain(prepared_data, directory, "zero.stage=1", "train.max_steps=8", resume="auto")
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "checkpoint step00000008 fails verification" in resumed.output
    assert "resumed from step00000004 at step 4" in resumed.output
    assert resumed.losses() == {step: loss for step, loss in reference.losses().items() if step > 4}


@pytest.mark.parametrize("stage", [0, 1])
def test_a_nonfinite_loss_is_skipped_on_every_rank_and_counted(prepared_data, tmp_path, stage):
    run = run_pretrain(
        prepared_data, tmp_path / "run", f"zero.stage={stage}", extra_env={"PERFORMER_FAULTS": "nonfinite_loss@3"}
    )
    assert run.returncode == 0, run.output[-4000:]
    skips = [r for r in run.records("event") if "nonfinite_loss" in r]
    assert [(r["step"], r["skipped_total"]) for r in skips] == [(2, 1)]
    losses = run.losses()
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    assert run.records("train")[-1]["skipped_steps"] == 1


def test_consecutive_nonfinite_losses_stop_with_the_last_good_weights(prepared_data, tmp_path):
    """Three NaN losses in a row after step 2: exit 3, and the checkpoint it writes holds exactly
    the weights of step 2 (the skipped attempts changed nothing), compared bitwise with a clean run."""
    faulty = run_pretrain(
        prepared_data,
        tmp_path / "faulty",
        "zero.stage=0",
        "train.max_consecutive_nonfinite=3",
        extra_env={"PERFORMER_FAULTS": "nonfinite_loss@3,4,5"},
    )
    assert faulty.returncode == 3, faulty.output[-4000:]
    assert "3 non-finite losses in a row at step 2" in faulty.output
    assert (faulty.directory / "checkpoints" / "latest").read_text().strip() == "step00000002"
    clean = run_pretrain(
        prepared_data, tmp_path / "clean", "zero.stage=0", "train.max_steps=2", "checkpoint.interval=2"
    )
    assert clean.returncode == 0, clean.output[-4000:]

    def weights(run):
        path = run.directory / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
        return torch.load(path, map_location="cpu", weights_only=False)["module"]  # our own test files

    faulty_weights, clean_weights = weights(faulty), weights(clean)
    assert faulty_weights.keys() == clean_weights.keys()
    assert all(torch.equal(faulty_weights[name], clean_weights[name]) for name in clean_weights)


def test_time_budget_saves_exits_75_and_resumes(runs, prepared_data, tmp_path):
    directory = tmp_path / "run"
    stopped = run_pretrain(prepared_data, directory, "zero.stage=1", "train.time_budget_s=0")
    assert stopped.returncode == 75, stopped.output[-4000:]
    assert (directory / "checkpoints" / "step00000001" / "COMPLETE").is_file()
    resumed = run_pretrain(prepared_data, directory, "zero.stage=1", resume="auto")
    assert resumed.returncode == 0, resumed.output[-4000:]
    reference = runs("zero1").losses()
    assert {s: loss for s, loss in resumed.losses().items() if s > 1} == {
        s: loss for s, loss in reference.items() if s > 1
    }


def test_sigusr1_checkpoints_at_the_next_step_and_exits_75(prepared_data, tmp_path):
    directory = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "launcher.pretrain",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--set",
        *__import__("jobs").TEST_SETTINGS,
        f"data.manifest={prepared_data / 'train'}",
        f"train.output_dir={directory}",
        "train.max_steps=100000",
        "eval.interval=0",
    ]
    environment = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = directory / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"train"') >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended or stalled before training"
        time.sleep(0.2)
    process.send_signal(signal.SIGUSR1)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 75, output[-4000:]
    assert "SIGUSR1" in output
    saved = (directory / "checkpoints" / "latest").read_text().strip()
    last_logged = max(r["step"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train")
    assert saved == f"step{last_logged:08d}"  # zero steps lost


def test_export_reproduces_the_training_models_eval_loss(runs, tmp_path):
    """The exported fp32 model gives the eval loss the trainer logged, on the same batches."""
    from data.stream import StreamConfig, TokenStream
    from launcher.commands.export import export_checkpoint
    from performer import from_pretrained

    for name in ("zero2", "zero3"):
        run = runs(name)
        out = export_checkpoint(run.directory, tmp_path / f"export-{name}")
        model = from_pretrained(out)
        assert all(bool(a.projection_fixed) for a in model.favor_attentions())
        assert (out / "tokenizer").is_dir() and not list(out.glob("*.pt"))
        config = json.loads((run.directory / "checkpoints" / "step00000008" / "COMPLETE").read_text())["run_config"]
        losses = []
        for rank in range(2):
            stream = TokenStream(
                StreamConfig(
                    manifest=config["data"]["eval_manifest"]
                    or str(Path(config["data"]["manifest"]).parent / "heldout"),
                    objective="span_corruption",
                    input_length=64,
                    batch_size=4,
                    seed=0,
                    max_epochs=1,
                    verify_sha256=False,
                ),
                rank=rank,
                world_size=2,
            )
            rank_losses = []
            with torch.no_grad():
                for index, batch in enumerate(stream.iter_epoch()):
                    if index == 2:
                        break
                    rank_losses.append(float(model(**batch).loss))
                    # generate() starts where training targets start (bos), without being told.
                    starts = set(batch["decoder_input_ids"][:, 0].tolist())
                    assert starts == {model.config.decoder_start_id} == {3}
                    source = batch["input_ids"][:1, :16]
                    assert torch.equal(
                        model.generate(source, max_new_tokens=3),
                        model.generate(source, max_new_tokens=3, decoder_start_id=3),
                    )
            losses.append(sum(rank_losses) / len(rank_losses))
        logged = {r["step"]: r["loss"] for r in run.records("eval")}[8]
        assert sum(losses) / 2 == pytest.approx(logged, abs=1e-5)


def test_config_errors_fail_before_any_work(prepared_data, tmp_path):
    typo = run_pretrain(prepared_data, tmp_path / "a", "trian.max_steps=3", ranks=1)
    assert typo.returncode == 2 and "did you mean 'train'" in typo.output
    missing = run_pretrain(prepared_data, tmp_path / "b", ranks=1, resume="step00000042")
    assert missing.returncode == 2 and "no checkpoint 'step00000042'" in missing.output
    assert not (tmp_path / "b" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3"])
def test_memory_records_count_what_each_rank_holds(runs, name):
    """The trainer's "memory" record (launcher/memory.py) per log interval: every rank's model-state
    bytes by role, taken after the backward, and its resident set; Adam's moments and the fp32
    master weights are split over the 2 ranks from ZeRO-1 on (fp32 run: 4 bytes each)."""
    records = runs(name).records("memory")
    assert [r["step"] for r in records] == list(range(1, 9))
    last = records[-1]
    assert len(last["per_rank"]) == 2
    for rank in last["per_rank"]:
        assert rank["total"] == sum(rank[role] for role in ("parameters", "gradients", "optimizer", "buffers"))
        assert 0 < rank["rss_bytes"] <= rank["peak_rss_bytes"]
    assert last["model_state_bytes"] == max(rank["total"] for rank in last["per_rank"])
    parameters = runs("zero0").records("memory")[-1]["per_rank"][0]["parameters"] // 4  # fp32, all whole
    optimizer = [rank["optimizer"] for rank in last["per_rank"]]
    if name == "zero0":
        assert all(rank["gradients"] == 4 * parameters for rank in last["per_rank"])
        assert all(8 * parameters <= bytes_ < 8 * parameters + 4096 for bytes_ in optimizer)  # + step counters
    else:  # fp32 master partition + two moments, a half each (DeepSpeed pads partitions a little)
        assert all(abs(bytes_ - 12 * parameters / 2) < 0.01 * 12 * parameters / 2 for bytes_ in optimizer), optimizer


def test_the_real_engine_decays_matrices_only_at_the_scheduled_rate_and_hashes_checkpoints_as_written(tmp_path):
    """ZeRO 0-3 and offload on 2 ranks: zero gradients leave only decoupled weight decay, so what
    moved says which parameters decay and by how much says each step's rate (engine_probe.py).
    Each setting's checkpoint: every file hashed while DeepSpeed wrote it, with the digest of the
    file on disk, none left to read back."""
    import re

    from jobs import BIN, free_port, launch_environment

    from launcher.schedule import learning_rate

    out = tmp_path / "probe.json"
    command = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "launcher" / "engine_probe.py"),
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, env=launch_environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    decaying = re.compile(r"(q_proj|k_proj|v_proj|out_proj|w_in|w_out)\.weight$")
    expected_rates = [learning_rate(step, 0.01, 3, 6, 0.1) for step in range(1, 7)]
    assert expected_rates[0] > 0 and expected_rates[2] == 0.01 and expected_rates[5] == pytest.approx(0.001)
    for setting, result in json.loads(out.read_text()).items():
        assert result["moved"] and all(decaying.search(name) for name in result["moved"]), setting
        assert not any(decaying.search(name) for name in result["still"]), setting
        assert "embedding.tokens.weight" in result["still"], setting
        # (measured from float32 ratios near 1: three significant digits)
        assert result["rates"] == pytest.approx(expected_rates, rel=2e-3), setting
        assert result["groups"]["decay"]["tensors"] == len(result["moved"]) == 32
        assert result["groups"]["no_decay"]["tensors"] == len(result["still"])
        optimizer = [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
        written = {
            "zero0": ["mp_rank_00_model_states.pt"],
            "zero3": sorted([f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in (0, 1)] + optimizer),
        }.get(setting, ["mp_rank_00_model_states.pt", *optimizer])
        assert result["hashed_while_written"] == written, setting
        assert result["read_back"] == [] and result["digests_differing"] == [], setting


def test_a_two_source_mixture_trains_and_counts_tokens_per_source(prepared_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sources = (
        f"data.sources=[{{manifest: {prepared_data / 'train'}, weight: 3, name: web}}, "
        f"{{manifest: {prepared_data / 'heldout'}, weight: 1, name: code}}]"
    )
    run = run_pretrain(prepared_data, tmp_path / "mix", sources, "train.max_steps=6", "eval.interval=0")
    assert run.returncode == 0, run.output[-4000:]
    records = run.records("train")
    assert [r["step"] for r in records] == list(range(1, 7)) and all(map(math.isfinite, run.losses().values()))
    raw_length = 70  # span corruption's packed row for 64 input tokens
    for record in records:  # every row of every global batch (2 ranks x 4 rows) counted once, by source
        assert record["data_tokens_web"] + record["data_tokens_code"] == record["step"] * 2 * 4 * raw_length
    last = records[-1]
    assert last["data_tokens_web"] > last["data_tokens_code"] > 0
    accumulator = EventAccumulator(str(run.directory / "tensorboard"))
    accumulator.Reload()
    assert {"train/data_tokens_web", "train/data_tokens_code"} <= set(accumulator.Tags()["scalars"])
