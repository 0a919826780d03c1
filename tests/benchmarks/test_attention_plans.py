"""benchmarks/attention.py's forced kernel plans (the GPU check's tune phase): the suffix is read
as written, the plan reaches the Triton kernels (here in Triton's interpreter) and computes what
the default op does, and the summary names the fastest plan per length."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import attention  # noqa: E402
from performer.attention import triton as favor_triton  # noqa: E402
from performer.attention.fused import favor_attention_torch  # noqa: E402
from performer.feature_maps import gaussian_orthogonal_projection  # noqa: E402


@pytest.mark.parametrize(
    ("suffix", "forced"),
    [
        ("", {}),
        ("128", {"chunk": 128}),
        ("c64w4s2", {"chunk": 64, "num_warps": 4, "num_stages": 2}),
        ("w8m32", {"num_warps": 8, "block_m": 32}),
    ],
)
def test_a_plan_suffix_reads_as_written(suffix, forced):
    assert attention.plan_overrides(suffix) == forced


@pytest.mark.parametrize("suffix", ["c64x4", "c64c32", "w", "64w4", "c64 w4", "0", "w3"])
def test_a_malformed_plan_suffix_says_how_to_write_one(suffix):
    with pytest.raises(ValueError, match=f"bad plan .* in the implementation's @{suffix}"):
        attention.plan_overrides(suffix)


@pytest.mark.parametrize("implementation", ["ours-torch-causal@w4", "sdpa@c64s2"])
def test_a_plan_for_an_op_without_the_kernels_is_refused(implementation):
    with pytest.raises(ValueError, match="only ours-causal, ours-bidirectional, ours-causal-bf16-logits"):
        attention.build(implementation, 64, 2, 16, 24, "cpu", torch.float32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's CPU tensors")
@pytest.mark.parametrize("implementation", ["ours-causal@c16w4s1m32", "ours-bidirectional@c32w2"])
def test_a_forced_plan_reaches_the_kernels_and_computes_the_default_ops_answer(implementation, monkeypatch):
    plans = []
    planned = favor_triton.favor_attention_planned

    def recording(*args):
        plans.append(args[-1])
        return planned(*args)

    monkeypatch.setattr(favor_triton, "favor_attention_planned", recording)
    length, heads, head_dim, nb_features = 40, 2, 16, 48
    op, chunk, prepare = attention.build(implementation, length, heads, head_dim, nb_features, "cpu", torch.float32)
    q, k, v = prepare(*(torch.randn(1, heads, length, head_dim) for _ in range(3)))
    got = op(q, k, v)

    forced = attention.plan_overrides(implementation.partition("@")[2])
    (plan,) = plans
    assert {name: getattr(plan, name) for name in forced} == forced
    assert chunk == forced["chunk"]
    projection = gaussian_orthogonal_projection(nb_features, head_dim, seed=0)
    causal = "causal" in implementation
    torch.testing.assert_close(got, favor_attention_torch(q, k, v, projection, causal=causal), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's CPU tensors")
@pytest.mark.parametrize(
    ("implementation", "chunk"),
    [("ours-causal@c24w4", 32), ("ours-causal@c128w4", 64), ("ours-bidirectional@s2", 64), ("ours-causal@24", 24)],
)
def test_the_chunk_recorded_is_the_one_the_kernels_take(implementation, chunk, monkeypatch):
    """make_plan rounds a chunk up to a power of two and caps float32 at 64; a named plan ignores
    PERFORMER_FAVOR_PLAN (here c16). On the CPU, "@24" alone is the torch op's chunk, as given."""
    monkeypatch.setenv(favor_triton.PLAN_ENV, "c16")
    plans = []
    planned = favor_triton.favor_attention_planned
    monkeypatch.setattr(favor_triton, "favor_attention_planned", lambda *args: plans.append(args[-1]) or planned(*args))
    op, recorded, prepare = attention.build(implementation, 40, 1, 16, 16, "cpu", torch.float32)
    op(*prepare(*(torch.randn(1, 1, 40, 16) for _ in range(3))))
    assert recorded == chunk
    assert [plan.chunk for plan in plans] == ([] if implementation.endswith("@24") else [chunk])


def _measure(implementation):
    """benchmarks/attention.py's worker on a tiny causal shape, in the interpreter (one repeat)."""
    args = argparse.Namespace(
        impl=implementation, length=32, threads=1, device="cpu", dtype="fp32", batch=1, heads=1,
        head_dim=16, nb_features=16, repeats=1, slow_call_s=10.0,
    )  # fmt: skip
    return attention.measure(args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's CPU tensors")
def test_a_measured_forced_plan_records_what_it_forced():
    record = _measure("ours-causal@c16w4")
    assert record["forced_plan"] == {"chunk": 16, "num_warps": 4}
    assert record["chunk"] == 16 and record["median_s"] > 0
    assert "environment_plan" not in record


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's CPU tensors")
def test_a_measurement_under_an_environment_plan_says_so(monkeypatch):
    monkeypatch.setenv(favor_triton.PLAN_ENV, "w4")
    assert _measure("ours-causal")["environment_plan"] == "w4"


def test_the_summary_names_the_fastest_plan_per_length_against_the_default():
    def timed(implementation, length, seconds):
        return {"impl": implementation, "length": length, "median_s": seconds, "memory_bytes": 1}

    records = [
        timed("ours-causal", 1024, 2.0),
        timed("ours-causal@c64w4s2", 1024, 1.0),
        timed("ours-causal@c128w8s3", 1024, 4.0),
        timed("sdpa-causal", 1024, 1.5),
        timed("ours-causal", 16384, 1.0),
        {"impl": "ours-causal@c64w4s2", "length": 16384, "error": "out of GPU memory"},
        timed("ours-bidirectional", 16384, 1.0),
    ]
    summary = attention.summarise(records)
    assert summary["fastest_plan_ours-causal@1024"] == "ours-causal@c64w4s2"
    assert summary["fastest_plan_speedup_ours-causal@1024"] == pytest.approx(2.0)
    # A length where only the default ran, or a plan failed, names no fastest plan.
    assert not any(key.endswith("@16384") and key.startswith("fastest_plan") for key in summary)
    # The speedup against flash is the default plan's, not the fastest variant's.
    assert summary["speedup_vs_sdpa-causal@1024"] == pytest.approx(0.75)
