"""PERFORMER_FAULTS: the spec language of launcher/faults.py (strict, off unless set)."""

from __future__ import annotations

import pytest
from jobs import run_pretrain

from launcher.faults import Faults, FaultSpecError, SaveFault, StepFault


def test_unset_or_empty_means_no_faults():
    assert not Faults.from_environment({})
    assert not Faults.parse("  ")


def test_every_fault_parses():
    faults = Faults.parse(
        "nonfinite_loss@3,4; inf_loss@7; kill@step=6,rank=1; hang@step=3,rank=0,seconds=2.5;"
        " slow_save@save=2,rank=1; enospc@save=1"
    )
    assert faults.nonfinite_loss_attempts == {3, 4} and faults.inf_loss_attempts == {7}
    assert faults.step_faults == (StepFault("kill", 6, 1), StepFault("hang", 3, 0, 2.5))
    assert faults.save_faults == (SaveFault("slow_save", 2, 1), SaveFault("enospc", 1, None))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("oom@3", "unknown fault 'oom'"),
        ("nonfinite_loss", "has no '@where'"),
        ("nonfinite_loss@x", "attempt='x' is not a number"),
        ("kill@step=3", "kill needs rank"),
        ("kill@step=3,rank=1,after=2", "unknown key 'after' for kill"),
        ("hang@step=0,rank=1", "step='0' is out of range"),
        ("hang@step=3,rank=-1", "rank='-1' is out of range"),
        ("enospc@save=1,save=2", "save given twice"),
        ("slow_save@save=2,rank", "expected key=value"),
    ],
)
def test_malformed_specs_are_errors_naming_the_item(spec, message):
    with pytest.raises(FaultSpecError, match=message):
        Faults.parse(spec)


@pytest.mark.slow
def test_the_trainer_refuses_a_malformed_spec_before_any_work(prepared_data, tmp_path):
    run = run_pretrain(prepared_data, tmp_path / "run", ranks=1, extra_env={"PERFORMER_FAULTS": "kill@step=3"})
    assert run.returncode == 2 and "PERFORMER_FAULTS: 'kill@step=3': kill needs rank" in run.output
    assert not (tmp_path / "run").exists()
