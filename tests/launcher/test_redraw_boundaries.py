"""Evaluations, checkpoints and exports carry the projection the weights last trained with.

A redraw takes effect for the next step. The observer (``projection_observer/sitecustomize.py``)
records, inside every rank, the projection each FAVOR+ attention is handed at each call, so these
tests compare what the trainer evaluated, saved and exported with what its training steps used,
not with what it says it used. Real DeepSpeed engines on 2 CPU ranks.
"""

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from jobs import run_pretrain
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

OBSERVER = Path(__file__).parent / "projection_observer"
# New draws after steps 2 and 4. swap: steps 1-2 train with draw 0, 3-4 with draw 2, 5-6 with draw
# 4. smooth: every step has its own projection (draw 0, half way to draw 2, draw 2, half way to 4...).
SETTINGS = ["model.feature_redraw_interval=2", "eval.interval=2", "checkpoint.interval=2", "checkpoint.keep=10"]
STEPS = 6
MODES = ["swap", "smooth"]


def observed(log: Path, settings=(), **kwargs):
    log.mkdir(exist_ok=True)
    path = os.pathsep.join(filter(None, [str(OBSERVER), os.environ.get("PYTHONPATH")]))
    return {"extra_env": {"PYTHONPATH": path, "PERFORMER_TEST_PROJECTION_LOG": str(log)}, **kwargs}


def calls(log: Path) -> dict[tuple[str, int], list[tuple[str, str]]]:
    """(process file, projection id) -> [(mode, sha256), ...] in call order."""
    sequences = defaultdict(list)
    for path in sorted(log.glob("rank*.jsonl")):
        for record in map(json.loads, path.read_text().splitlines()):
            sequences[(path.name, record["id"])].append((record["mode"], record["sha256"]))
    return dict(sequences)


def training_steps(sequence: list[tuple[str, str]]) -> list[str]:
    """The projection of each training step (one training call per layer and step here)."""
    return [sha for mode, sha in sequence if mode == "train"]


def sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().numpy().tobytes()).hexdigest()


def projections_by_id(state_dict: dict[str, torch.Tensor]) -> dict[int, str]:
    """projection id -> sha256 of its projection, from a model state dict."""
    found = {}
    for name, draw in state_dict.items():
        if name.endswith(".projection_draw"):
            found[int(draw[1])] = sha256(state_dict[name.removesuffix("_draw")])
    return found


@pytest.fixture(scope="module", params=MODES)
def redrawn_run(prepared_data, tmp_path_factory, request):
    base = tmp_path_factory.mktemp(f"redraws-{request.param}")
    run = run_pretrain(
        prepared_data,
        base / "run",
        *SETTINGS,
        f"model.redraw_mode={request.param}",
        f"train.max_steps={STEPS}",
        **observed(base / "log"),
    )
    assert run.returncode == 0, run.output[-4000:]
    return run, calls(base / "log"), request.param


def test_training_uses_each_draw_for_the_steps_after_it(redrawn_run):
    _, sequences, mode = redrawn_run
    assert len({process for process, _ in sequences}) == 2  # both ranks observed
    for sequence in sequences.values():
        steps = training_steps(sequence)
        assert len(steps) == STEPS
        if mode == "swap":
            assert steps[0] == steps[1] != steps[2] == steps[3] != steps[4] == steps[5]
        else:
            assert len(set(steps)) == STEPS  # one small move per step


def test_every_evaluation_uses_the_projection_the_step_before_it_trained_with(redrawn_run):
    run, sequences, _ = redrawn_run
    assert sorted(r["step"] for r in run.records("eval")) == [2, 4, 6]
    for sequence in sequences.values():
        last_trained, evaluated_after = None, []
        for mode, sha in sequence:
            if mode == "train":
                last_trained = sha
            else:
                assert sha == last_trained, "an evaluation used a projection no training step had used"
                if not evaluated_after or evaluated_after[-1] != last_trained:
                    evaluated_after.append(last_trained)
        steps = training_steps(sequence)
        assert evaluated_after == [steps[1], steps[3], steps[5]]


def test_every_checkpoint_holds_the_projection_its_last_step_trained_with(redrawn_run):
    run, sequences, mode = redrawn_run
    rank0 = {layer: training_steps(seq) for (process, layer), seq in sequences.items() if process.startswith("rank0")}
    for step in (2, 4, 6):
        tag = run.directory / "checkpoints" / f"step{step:08d}"
        # The test's own checkpoint (DeepSpeed's module file holds non-tensor objects too).
        module = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        saved = projections_by_id(module)
        assert saved == {layer: steps[step - 1] for layer, steps in rank0.items()}
        record = json.loads((tag / "COMPLETE").read_text())["projection"]
        assert record["draw"] == step - 2  # steps 2, 4, 6 train with draws 0, 2, 4 (smooth: half way on)
        if mode == "swap":
            assert record["trained_steps"] == [step - 1, step] and "blend_weight" not in record
        else:
            assert record["trained_steps"] == [step, step]
            assert (record["next_draw"], record["blend_weight"]) == (step, 0.5)


def test_the_export_carries_the_projection_the_last_steps_trained_with(redrawn_run, tmp_path):
    from launcher.commands.export import export_checkpoint

    run, sequences, mode = redrawn_run
    out = export_checkpoint(run.directory, tmp_path / "export")
    exported = projections_by_id(load_file(str(out / "model.safetensors")))
    rank0 = {
        layer: training_steps(seq)[-1] for (process, layer), seq in sequences.items() if process.startswith("rank0")
    }
    assert exported == rank0
    projections = json.loads((out / "config.json").read_text())["projections"]
    card = (out / "README.md").read_text()
    if mode == "swap":
        assert projections["redraw_step"] == 4 and projections["trained_steps"] == [5, 6]
        assert "draw 4, trained with in steps 5-6" in card
    else:
        assert projections["trained_steps"] == [6, 6] and projections["blend"] == {"next_draw": 6, "weight": 0.5}
        assert "a blend of draws 4 and 6 (weight 0.500), trained with in step 6" in card


@pytest.mark.parametrize("redrawn_run", ["swap"], indirect=True)  # checkpoints before the record were all swap
def test_an_older_checkpoint_holding_an_untrained_draw_exports_the_trained_one(redrawn_run, tmp_path):
    """Checkpoints written before the fix hold, at a redraw step, the next step's draw: the
    export draws the trained one again from (base seed, step)."""
    import shutil

    from launcher.checkpoint import _file_digest
    from launcher.commands.export import export_checkpoint
    from performer.config import ModelConfig
    from performer.models import PerformerSeq2Seq

    run, sequences, _ = redrawn_run
    copy = tmp_path / "run"
    shutil.copytree(run.directory, copy)
    tag = copy / "checkpoints" / "step00000004"
    states_path = tag / "mp_rank_00_model_states.pt"
    states = torch.load(states_path, map_location="cpu", weights_only=False)
    marker = json.loads((tag / "COMPLETE").read_text())
    model = PerformerSeq2Seq(ModelConfig.from_dict(marker["model_config"]))
    model.load_state_dict(states["module"])
    model.redraw_projection_matrices_(step=4)  # what the old trainer saved at step 4
    states["module"].update({n: t for n, t in model.state_dict().items() if "projection" in n})
    torch.save(states, states_path)
    del marker["projection"]  # old markers have no record
    marker["files"]["mp_rank_00_model_states.pt"] = _file_digest(states_path)
    (tag / "COMPLETE").write_text(json.dumps(marker))

    out = export_checkpoint(copy, tmp_path / "export", tag="step00000004")
    rank0 = {
        layer: training_steps(seq)[3] for (process, layer), seq in sequences.items() if process.startswith("rank0")
    }
    assert projections_by_id(load_file(str(out / "model.safetensors"))) == rank0
    assert json.loads((out / "config.json").read_text())["projections"]["trained_steps"] == [3, 4]


def test_resuming_at_a_redraw_step_trains_on_bitwise_with_the_next_draw(redrawn_run, tmp_path):
    import shutil

    reference, reference_calls, mode = redrawn_run
    copy = tmp_path / "run"
    shutil.copytree(reference.directory, copy)
    shutil.rmtree(copy / "checkpoints" / "step00000006")  # as if stopped after the step-4 save
    metrics = copy / "metrics.jsonl"
    kept = [line for line in metrics.read_text().splitlines() if json.loads(line).get("step", 0) <= 4]
    metrics.write_text("\n".join(kept) + "\n")
    data = Path(
        json.loads((copy / "checkpoints" / "step00000004" / "COMPLETE").read_text())["run_config"]["data"]["manifest"]
    ).parent
    resumed = run_pretrain(
        data,
        copy,
        *SETTINGS,
        f"model.redraw_mode={mode}",
        f"train.max_steps={STEPS}",
        resume="auto",
        **observed(tmp_path / "log"),
    )
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "resumed from step00000004" in resumed.output
    assert resumed.losses() == reference.losses()
    assert sorted(r["step"] for r in resumed.records("train") if r["step"] > 4) == [5, 6]
    for (process, layer), sequence in calls(tmp_path / "log").items():
        rank = process.split("-")[0]
        expected = next(seq for (p, lay), seq in reference_calls.items() if p.startswith(rank + "-") and lay == layer)
        assert training_steps(sequence) == training_steps(expected)[4:]
