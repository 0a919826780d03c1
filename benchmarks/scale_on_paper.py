"""Scale on paper: the largest model per 80 GB GPU at each ZeRO stage, and `large`'s step time at 8-4,096 GPUs.

    python benchmarks/scale_on_paper.py       # pure computation from committed measurements, seconds

No training. Inputs, all measured and committed:
* benchmarks/results/zero_memory.json: bytes per parameter each rank held, by role (parameters,
  gradients, optimizer), for ZeRO 0-3 on 2 ranks (`small` preset, bf16), and the staging buffers;
* benchmarks/results/model_step-gpu.json: an H200 run of the `medium` seq2seq (bf16 autocast,
  FAVOR+, batch 1, encoder L / decoder L/4): tokens/s, peak memory, the dense bf16 matmul rate
  and hence MFU;
* benchmarks/results/attention-gpu.json: FAVOR+ vs SDPA on the same GPU (for the attention's share);
* benchmarks/results/step_overhead.json: the small (latency-bound) collectives of one optimizer
  step, counted per ZeRO stage on the real trainer (the control plane's per-step cost);
* benchmarks/results/checkpoint_io.json: what hashing adds to DeepSpeed's checkpoint write.

Every assumption the projection rests on is a named constant or option below and is printed in
the markdown output beside the tables. Writes benchmarks/results/<name>.json and <name>.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from performer.config import PRESETS  # noqa: E402

GIB = 2**30
STAGES = ("zero0", "zero1", "zero2", "zero3", "zero3-sized", "zero3-offload")
ROLES = ("parameters", "gradients", "optimizer")
# Offload moves the partitioned optimizer state and the parameter partitions to host memory: on
# the GPU stay the gradients' partition and the layers being computed.
ON_HOST = {"zero3-offload": ("optimizer", "parameters")}
# DeepSpeed's reduce bucket (reduce_bucket_size, 5e8 elements by default, which the trainer keeps):
# ZeRO-3 holds it for good (measured: the buffers column); ZeRO-1/2 allocate it at every backward
# and release it after, so the after-backward figure misses it: counted here at 4 bytes (an fp32
# accumulator, the larger of its two dtypes).
TRANSIENT_BUCKET_BYTES = {"zero1": 5e8 * 4, "zero2": 5e8 * 4}


def preset_shape(name: str) -> dict:
    """performer.config's preset ``name`` in this script's terms: d_model, heads, encoder/decoder layers."""
    shape = PRESETS[name]
    return dict(
        d_model=shape["d_model"],
        heads=shape["num_heads"],
        encoder_layers=shape["num_encoder_layers"],
        decoder_layers=shape["num_decoder_layers"],
    )


# ----------------------------------------------------------------------------- the model


def parameter_count(d_model: int, encoder_layers: int, decoder_layers: int, vocab: int) -> int:
    """Seq2seq Performer parameters: encoder layer 4 d^2 (attention) + 8 d^2 (SwiGLU with 2/3 x 4d
    hidden, three matrices); decoder layer adds cross-attention (4 d^2); tied embeddings V d. Norms
    and biases (under 0.1%) left out."""
    return 12 * d_model**2 * encoder_layers + 16 * d_model**2 * decoder_layers + vocab * d_model


def training_flops(
    d_model: int, encoder_layers: int, decoder_layers: int, vocab: int, input_tokens: int, target_tokens: int
) -> float:
    """Counted flops of one forward + backward, as performer.models.training_flops counts a built
    model (and model_step.py the measured one): 6 x the parameters each token passes through.
    Input tokens pass the encoder's layers (12 d^2) and every decoder layer's cross-attention keys
    and values (2 d^2); target tokens the rest of each decoder layer (14 d^2) and the tied vocabulary
    projection (V d)."""
    per_input_token = 12 * d_model**2 * encoder_layers + 2 * d_model**2 * decoder_layers
    per_target_token = 14 * d_model**2 * decoder_layers + vocab * d_model
    return 6.0 * (per_input_token * input_tokens + per_target_token * target_tokens)


def family(vocab: int, layers: int) -> list[dict]:
    """The models considered for 'largest that fits': `layers` + `layers` layers, width in steps of
    256, head dim 64."""
    return [
        dict(
            d_model=d,
            encoder_layers=layers,
            decoder_layers=layers,
            heads=d // 64,
            parameters=parameter_count(d, layers, layers, vocab),
        )
        for d in range(512, 16385, 256)
    ]


# ----------------------------------------------------------------------------- memory


def bytes_per_parameter(zero_memory: dict) -> dict[str, dict]:
    """Per stage and role, the bytes one parameter costs and whether ZeRO split the role over the
    ranks, read off the measurement: a role held at under 3/4 of ZeRO-0's per-rank bytes is
    partitioned (its per-rank figure times the ranks is what the whole model costs), otherwise it
    is whole on every rank.

    ZeRO-3's parameters are corrected for the measured model's small matrices: DeepSpeed keeps
    parameters under stage3_param_persistence_threshold (1e5 elements) whole on every rank, which
    at d_model 256 are all attention matrices (65,536 elements), and at the widths projected
    (d >= 512, 262,144 elements and up) only norms.
    """
    ranks = zero_memory["settings"]["ranks"]
    parameters = zero_memory["counts"]["parameters"]
    persistent = zero_memory["counts"]["below_stage3_persistence_threshold"]
    half_bytes = 2 if zero_memory["settings"]["precision"] in ("bf16", "fp16") else 4
    held = {}
    for record in zero_memory["records"]:
        if "per_rank" in record:
            held[record["stage"]] = max(record["per_rank"], key=lambda rank: rank["total"] - rank["buffers"])
    found = {}
    for stage, rank in held.items():
        roles: dict = {"buffers_bytes": rank["buffers"], "partitioned": []}
        for role in ROLES:
            value = rank[role]
            if stage in ("zero3", "zero3-offload") and role == "parameters":  # zero3-sized: threshold 2560
                value -= persistent * half_bytes
            split = "zero0" in held and value < 0.75 * held["zero0"][role]
            roles[role] = value / parameters * (ranks if split else 1)
            if split:
                roles["partitioned"].append(role)
        found[stage] = roles
    return found


def model_state_bytes(per_parameter: dict[str, float], stage: str, parameters: int, gpus: int) -> float:
    """GPU bytes of model states per rank for `parameters` on `gpus` data-parallel ranks."""
    total = 0.0
    for role in ("parameters", "gradients", "optimizer"):
        if role in ON_HOST.get(stage, ()):
            continue
        share = 1 / gpus if role in per_parameter["partitioned"] else 1
        total += per_parameter[role] * parameters * share
    return total


def activation_bytes_per_token_layer_width(model_step: dict) -> dict:
    """Activation bytes per token, per layer, per unit of d_model, from the H200 `medium` run of
    FAVOR+ without checkpointing: (peak - model states created by the step) / (tokens x layers x d).

    model_step.py measures peak allocated minus allocated before the first step, which is after
    the model (fp32 weights) exists: what the step adds is the fp32 gradients and AdamW's two fp32
    moments (12 bytes per parameter) plus the activations.
    """
    shape = preset_shape(model_step["settings"]["preset"])
    layers = shape["encoder_layers"] + shape["decoder_layers"]
    figures = {}
    for record in model_step["records"]:
        if record["model"] != "ours" or "memory_bytes" not in record:
            continue
        tokens = record["length"] + record["length"] // 4
        activations = record["memory_bytes"] - 12 * record["parameters"]
        figures[record["length"]] = activations / (tokens * layers * shape["d_model"])
    return figures


def activation_bytes(
    model: dict,
    tokens_per_micro_batch: int,
    per_token_layer_width: float,
    checkpointing: bool,
    checkpoint_bytes_per_token_width: float,
) -> float:
    """Peak activation bytes of one micro batch. Without checkpointing every layer keeps its
    activations; with checkpointing every layer keeps only its input (bf16: 2 bytes per token and
    unit of width) and one layer's activations are live again during its recomputation."""
    layers = model["encoder_layers"] + model["decoder_layers"]
    width = model["d_model"]
    if not checkpointing:
        return per_token_layer_width * tokens_per_micro_batch * layers * width
    kept = checkpoint_bytes_per_token_width * tokens_per_micro_batch * layers * width
    return kept + per_token_layer_width * tokens_per_micro_batch * width


# ----------------------------------------------------------------------------- time


def collective_volume_bytes(stage: str, parameters: int, gpus: int, bytes_per_value: int = 2) -> float:
    """Bytes each GPU sends (= receives) per optimizer step with ring collectives of bf16 values.

    ZeRO-0: one all-reduce of the gradients, 2 (N-1)/N x P values. ZeRO-1/2: reduce-scatter of the
    gradients + all-gather of the updated bf16 weights, the same 2 (N-1)/N x P. ZeRO-3: all-gather
    of the weights for the forward, again for the backward (with activation checkpointing the
    recomputed forward and the backward of a layer share one gather), and reduce-scatter of the
    gradients: 3 (N-1)/N x P.
    """
    passes = 3 if stage.startswith("zero3") else 2
    return passes * (gpus - 1) / gpus * parameters * bytes_per_value


def collective_seconds(volume: float, gpus: int, collectives: int, args) -> float:
    """Bandwidth term at the bus bandwidth of the slowest link the ring crosses, plus a latency
    term per collective (a tree's log2 N hops)."""
    bandwidth = args.nvlink_gbs if gpus <= args.gpus_per_node else args.ib_gbs
    latency = collectives * args.hop_latency_us * 1e-6 * math.log2(max(gpus, 2))
    return volume / (bandwidth * 1e9) + latency


def offload_seconds(parameters: int, gpus: int, args) -> float:
    """ZeRO-3 with optimizer and parameter offload, per step and GPU: over PCIe the bf16 gradient
    partition goes to the host and the bf16 parameter partition comes back for the forward, the
    backward and after the update (2 + 3 x 2 bytes per parameter of the partition), and the host
    runs AdamW on the fp32 partition (torch's AdamW: the trainer keeps zero_force_ds_cpu_optimizer
    off)."""
    partition = parameters / gpus
    return partition * 8 / (args.pcie_gbs * 1e9) + partition / args.host_adam_params_per_s


def small_collectives_per_step(path: Path) -> dict[str, float]:
    """The latency-bound collectives of one optimizer step per ZeRO stage (step_overhead.json): our
    non-finite / stop all-reduce and DeepSpeed's own (gradient norm, overflow), which do not grow
    with the model."""
    shares = json.loads(path.read_text())["shares"]
    return {f"zero{row['stage']}": row["small_per_step"] for row in shares}


def hashing_overhead(path: Path) -> float:
    """What a save as the trainer makes it (hashed while written, commit behind the loop) costs the
    step loop over DeepSpeed's own write, at the largest checkpoints measured (checkpoint_io.json;
    the larger of the stages), never below 0."""
    records = [r for r in json.loads(path.read_text())["records"] if "error" not in r]
    largest = max(r["checkpoint_bytes"] for r in records)
    near = [r for r in records if r["checkpoint_bytes"] >= largest / 2]
    return max(0.0, max(r["median_s"]["background_commit"] / r["median_s"]["ds_write"] - 1 for r in near))


def checkpoint_seconds(stage: str, parameters: int, gpus: int, hashing: float, args) -> dict[str, float]:
    """A checkpoint of `large` at N GPUs: bf16 weights (2 bytes per parameter) and fp32 master + Adam
    moments (12), as DeepSpeed lays them out. ZeRO-0: rank 0 writes everything; ZeRO-1/2: rank 0
    writes the whole weights file, every rank its optimizer partition; ZeRO-3: every rank its
    partition of both. A save takes the longer of the busiest node's bytes (rank 0's) over a node's
    storage bandwidth and the whole over the filesystem's (the nodes' sum, capped by the aggregate),
    plus the measured overhead of hashing. A resume reads every file once to verify it (spread over
    the ranks), then DeepSpeed's load: every rank reads the whole weights file at ZeRO-1/2 and the
    whole checkpoint at ZeRO-0, its partition at ZeRO-3; at the same bandwidths."""
    weights, optimizer = 2.0 * parameters, 12.0 * parameters
    total = weights + optimizer
    on_node = min(gpus, args.gpus_per_node)
    nodes = math.ceil(gpus / args.gpus_per_node)
    node_rate = args.storage_gbs_per_node * 1e9
    aggregate = min(nodes * args.storage_gbs_per_node, args.storage_aggregate_gbs) * 1e9
    if stage == "zero0":
        node_writes, rank_reads = total, total
    elif stage.startswith("zero3"):
        node_writes, rank_reads = total * on_node / gpus, total / gpus
    else:
        node_writes, rank_reads = weights + optimizer * on_node / gpus, weights + optimizer / gpus
    # Files: ZeRO-0 one (rank 0's); ZeRO-1/2 the weights file and an optimizer partition per rank;
    # ZeRO-3 a weights and an optimizer partition per rank. Each is created once and opened by a resume.
    files = 1 if stage == "zero0" else (1 + gpus if not stage.startswith("zero3") else 2 * gpus)
    opened = files if stage.startswith("zero3") else gpus * (1 if stage == "zero0" else 2)
    metadata = args.storage_files_per_s
    save = (max(node_writes / node_rate, total / aggregate) + files / metadata) * (1 + hashing)
    load = max(rank_reads * on_node / node_rate, rank_reads * gpus / aggregate) + opened / metadata
    resume = total / aggregate + files / metadata + load
    return {
        "checkpoint_bytes": total,
        "save_s": save,
        "resume_s": resume,
        "resume_bytes_read": total + rank_reads * gpus,
    }


def favor_seconds_per_token_head(attention: dict) -> dict[str, float]:
    """Our fused FAVOR+ op's forward + backward time per (token x head), bidirectional and causal,
    at the longest length measured on the GPU (attention-gpu.json, M=256, D=64), where the op is
    bound by its work rather than by kernel launches: the rate to scale to other shapes."""
    heads = attention["settings"]["heads"]
    rates = {}
    for kind in ("bidirectional", "causal"):
        records = [r for r in attention["records"] if r.get("impl") == f"ours-{kind}" and "median_s" in r]
        longest = max(records, key=lambda r: r["length"])
        rates[kind] = longest["median_s"] / (longest["length"] * heads)
    return rates


def favor_step_seconds(
    rates: dict[str, float], micro_batch: int, input_length: int, target_length: int, shape: dict, recompute: bool
) -> float:
    """Time of every FAVOR+ op in one step of a seq2seq model: per encoder layer a bidirectional
    op over the inputs; per decoder layer a causal op over the targets and a bidirectional
    cross-attention (its cost follows the keys, the inputs). Checkpointing runs the forward twice:
    about 4/3 of the forward + backward time."""
    heads = shape["heads"]
    encoder = shape["encoder_layers"] * rates["bidirectional"] * micro_batch * input_length * heads
    decoder = (
        shape["decoder_layers"]
        * micro_batch
        * heads
        * (rates["causal"] * target_length + rates["bidirectional"] * input_length)
    )
    return (encoder + decoder) * (4 / 3 if recompute else 1)


def measured_mfu(model_step: dict, tokens_per_step: int) -> tuple[float, dict]:
    """MFU of our FAVOR+ model measured on the H200 (model_step.py's training flops per step over the
    measured bf16 GEMM rate), interpolated on log(tokens per step) to the projected step's tokens;
    clamped to the measured range."""
    rate = model_step["gemm_flop_rate"]
    points = sorted(
        (r["length"] + r["length"] // 4, r["model_flops_per_step"] / r["median_s"] / rate)
        for r in model_step["records"]
        if r["model"] == "ours" and "median_s" in r
    )
    if tokens_per_step <= points[0][0]:
        return points[0][1], dict(points)
    for (t0, m0), (t1, m1) in zip(points, points[1:]):
        if tokens_per_step <= t1:
            f = math.log(tokens_per_step / t0) / math.log(t1 / t0)
            return m0 + f * (m1 - m0), dict(points)
    return points[-1][1], dict(points)


# ----------------------------------------------------------------------------- report


def compute(args) -> dict:
    zero_memory, model_step, attention = (
        json.loads((ROOT / path).read_text())  # relative to the repository
        for path in (args.zero_memory, args.model_step, args.attention)
    )
    per_parameter = bytes_per_parameter(zero_memory)
    activation_figures = activation_bytes_per_token_layer_width(model_step)
    per_token = max(activation_figures.values())  # the larger of the measured lengths: conservative
    target = args.target_length
    tokens_per_micro = args.micro_batch * (args.input_length + target)
    budget = args.gpu_gib * GIB * (1 - args.reserve_fraction) - args.runtime_gib * GIB

    fits = []
    candidates = family(args.vocab, args.layers)
    for stage in STAGES:
        if stage not in per_parameter:
            continue
        buffers = max(per_parameter[stage]["buffers_bytes"], TRANSIENT_BUCKET_BYTES.get(stage, 0.0))
        buffers = buffers if args.count_buffers else 0.0
        for checkpointing in (False, True):
            for gpus in args.gpus:
                best = None
                for model in candidates:
                    states = model_state_bytes(per_parameter[stage], stage, model["parameters"], gpus)
                    acts = activation_bytes(model, tokens_per_micro, per_token, checkpointing, args.checkpoint_bytes)
                    # ZeRO-3 gathers a layer's weights before using it: two layers' bf16 weights live.
                    gathered = 2 * 2 * 16 * model["d_model"] ** 2 if stage.startswith("zero3") else 0
                    if states + acts + gathered + buffers <= budget:
                        best = dict(
                            model,
                            model_states_gib=states / GIB,
                            activations_gib=acts / GIB,
                            at_family_limit=model is candidates[-1],
                        )
                fits.append(dict(stage=stage, checkpointing=checkpointing, gpus=gpus, largest=best))

    large = preset_shape("large")
    large_parameters = parameter_count(large["d_model"], large["encoder_layers"], large["decoder_layers"], args.vocab)
    large_non_embedding = large_parameters - args.vocab * large["d_model"]
    mfu, mfu_points = measured_mfu(model_step, tokens_per_micro)
    peak = model_step["gemm_flop_rate"]
    step_flops = training_flops(
        large["d_model"],
        large["encoder_layers"],
        large["decoder_layers"],
        args.vocab,
        args.micro_batch * args.input_length,
        args.micro_batch * target,
    ) * (4 / 3 if args.large_checkpointing else 1)
    favor_rates = favor_seconds_per_token_head(attention)
    favor_s = favor_step_seconds(
        favor_rates, args.micro_batch, args.input_length, target, large, args.large_checkpointing
    )
    # (Without them, as benchmarks/step_overhead.py asks for the step times it sets them against.)
    small_per_step = small_collectives_per_step(ROOT / args.step_overhead) if args.step_overhead else None
    hashing = hashing_overhead(ROOT / args.checkpoint_io) if args.checkpoint_io else None
    projections = []
    for stage in STAGES:
        if stage not in per_parameter:
            continue
        for gpus in args.gpus:
            volume = collective_volume_bytes(stage, large_parameters, gpus)
            collectives = args.collectives_zero3 if stage.startswith("zero3") else args.collectives_zero012
            communication = collective_seconds(volume, gpus, collectives, args)
            if stage == "zero3-offload":
                communication += offload_seconds(large_parameters, gpus, args)
            row = dict(stage=stage, gpus=gpus, volume_gib=volume / GIB, communication_s=communication)
            for name, utilisation in (("measured", mfu), ("assumed", args.assumed_mfu)):
                # The measured MFU already includes the FAVOR+ ops' time; the assumed one is for the
                # dense matmuls only, so the measured FAVOR+ time is added to it.
                compute_s = step_flops / (utilisation * peak) + (favor_s if name == "assumed" else 0.0)
                row[f"compute_s_{name}"] = compute_s
                row[f"step_s_{name}"] = compute_s + communication  # the trainer sets overlap_comm=False
                row[f"step_s_{name}_overlapped"] = max(compute_s, communication)
                row[f"tokens_per_s_{name}"] = tokens_per_micro * gpus / row[f"step_s_{name}"]
            if small_per_step is None or hashing is None:
                projections.append(row)
                continue
            small = small_per_step[stage.split("-")[0]]
            row["control_collectives"] = small
            row["control_s"] = small * args.hop_latency_us * 1e-6 * math.log2(max(gpus, 2))
            row.update(checkpoint_seconds(stage, large_parameters, gpus, hashing, args))
            row["checkpoint_amortized_s"] = row["save_s"] * row["step_s_assumed"] / args.checkpoint_every_s
            row["step_s_assumed_all_in"] = row["step_s_assumed"] + row["control_s"] + row["checkpoint_amortized_s"]
            projections.append(row)
    return {
        "settings": {key: getattr(args, key) for key in vars(args)},
        "inputs": {
            "bytes_per_parameter": per_parameter,
            "activation_bytes_per_token_layer_width": activation_figures,
            "activation_bytes_per_token_layer_width_used": per_token,
            "mfu_by_tokens_per_step": mfu_points,
            "mfu_used": mfu,
            "gemm_flop_rate": peak,
            "favor_seconds_per_token_head": favor_rates,
            "zero_memory_measured_parameters": zero_memory["counts"]["parameters"],
            "small_collectives_per_step": small_per_step,
            "checkpoint_hashing_overhead": hashing,
        },
        "large": {
            "parameters": large_parameters,
            "non_embedding_parameters": large_non_embedding,
            "tokens_per_gpu_step": tokens_per_micro,
            "flops_per_gpu_step": step_flops,
            "favor_seconds_per_step": favor_s,
        },
        "fits": fits,
        "projections": projections,
        "memory_budget_gib": budget / GIB,
    }


def markdown(results: dict) -> str:
    s, inputs, large = results["settings"], results["inputs"], results["large"]
    per_parameter = inputs["bytes_per_parameter"]
    lines = ["## Bytes per parameter, measured (benchmarks/results/zero_memory.json, 2 ranks, bf16)\n"]
    rows = []
    for stage, roles in per_parameter.items():
        rows.append(
            [
                stage,
                *(f"{roles[r]:.2f}" + (" / N" if r in roles["partitioned"] else "") for r in ROLES),
                common.mebibytes(roles["buffers_bytes"]),
                common.mebibytes(TRANSIENT_BUCKET_BYTES.get(stage)),
            ]
        )
    lines.append(
        common.table(
            [
                "ZeRO",
                "parameters (B)",
                "gradients (B)",
                "optimizer (B)",
                "buffers held per rank",
                "bucket during backward",
            ],
            rows,
        )
    )
    lines.append(
        "\nWhole-model bytes per parameter by role; / N: split over N data-parallel GPUs (a role held at "
        "under 3/4 of ZeRO-0's per-rank bytes; its per-rank figure x 2). ZeRO-3 parameters: less the "
        "measured model's matrices under DeepSpeed's persistence threshold (kept whole; at the widths "
        "projected only norms are). zero3-offload keeps optimizer and parameter partitions in host memory: "
        "on the GPU only the gradient partition and the gathered layers.\n"
    )

    lines.append(f"## Largest model per {s['gpu_gib']:.0f} GB GPU\n")
    header = ["ZeRO", "activation checkpointing", *(f"{n} GPUs" for n in s["gpus"])]
    rows = []
    for stage in (stage for stage in STAGES if stage in per_parameter):
        for checkpointing in (False, True):
            cells = []
            for gpus in s["gpus"]:
                fit = next(
                    f
                    for f in results["fits"]
                    if (f["stage"], f["checkpointing"], f["gpus"]) == (stage, checkpointing, gpus)
                )
                best = fit["largest"]
                cells.append(
                    "none"
                    if best is None
                    else f"{'>= ' if best['at_family_limit'] else ''}"
                    f"{best['parameters'] / 1e9:.2f}B (d {best['d_model']}; "
                    f"states {best['model_states_gib']:.0f} + act {best['activations_gib']:.0f} GiB)"
                )
            rows.append([stage, "on" if checkpointing else "off", *cells])
    lines.append(common.table(header, rows))
    lines.append(
        f"\n'>=': the largest width of the family fits. Family: {s['layers']} encoder + {s['layers']} decoder "
        f"layers, width d in steps of 256, head dim "
        f"64, SwiGLU 4d (2/3 x 4d hidden), vocabulary {s['vocab']:,}, tied embeddings "
        f"(parameters = 12 d^2 per encoder layer + 16 d^2 per decoder layer + V d).\n"
    )

    lines.append(
        f"## Projected step time of `large` ({large['parameters'] / 1e6:.0f}M parameters, "
        f"{s['micro_batch']} x ({s['input_length']} + {s['target_length']}) tokens per GPU per step)\n"
    )
    rows = []
    for row in results["projections"]:
        rows.append(
            [
                row["stage"],
                row["gpus"],
                f"{row['volume_gib']:.2f} GiB",
                common.seconds(row["communication_s"]),
                common.seconds(row["compute_s_measured"]),
                common.seconds(row["step_s_measured"]),
                f"{row['tokens_per_s_measured'] / 1e6:.2f}M",
                common.seconds(row["compute_s_assumed"]),
                common.seconds(row["step_s_assumed"]),
                common.seconds(row["step_s_assumed_overlapped"]),
                f"{row['tokens_per_s_assumed'] / 1e6:.2f}M",
            ]
        )
    lines.append(
        common.table(
            [
                "ZeRO",
                "GPUs",
                "sent per GPU",
                "comm",
                f"compute @ MFU {inputs['mfu_used']:.1%}",
                "step",
                "tokens/s",
                f"compute @ MFU {s['assumed_mfu']:.0%} + FAVOR+ ops",
                "step",
                "step, comm overlapped",
                "tokens/s",
            ],
            rows,
        )
    )

    lines.append(
        "\n## Control plane and checkpoints at scale (`large`, the assumed-MFU step)\n\n" + control_table(results)
    )

    mfu_points = ", ".join(f"{int(t):,} tokens/step: {m:.1%}" for t, m in inputs["mfu_by_tokens_per_step"].items())
    acts = ", ".join(
        f"L={length}: {value:.1f}" for length, value in inputs["activation_bytes_per_token_layer_width"].items()
    )
    lines += [
        "",
        "## Assumptions",
        "",
        f"- Memory per GPU: {s['gpu_gib']:.0f} GiB, {s['reserve_fraction']:.0%} kept back for allocator "
        f"fragmentation, {s['runtime_gib']:.1f} GiB for the CUDA context and NCCL: budget "
        f"{results['memory_budget_gib']:.1f} GiB.",
        f"- Model states: the measured bytes per parameter above (bf16 weights and gradients, fp32 master "
        f"weights and Adam moments), partitioned as ZeRO defines. DeepSpeed's staging buffers (reduce bucket "
        f"of reduce_bucket_size = 5e8 elements, allocated whole on a GPU) "
        f"{'are' if s['count_buffers'] else 'are not'} added: ZeRO-3 the measured size per rank; ZeRO-1/2 allocate "
        f"it at every backward and release it after, counted at 5e8 x 4 bytes.",
        f"- Activations: {inputs['activation_bytes_per_token_layer_width_used']:.1f} bytes per token, per layer, "
        f"per unit of d_model, measured on the H200 `medium` FAVOR+ step without checkpointing (model_step-gpu: "
        f"peak minus the step's fp32 gradients and Adam moments; {acts}; linear in length, as FAVOR+ is), the "
        f"larger figure used. With checkpointing every layer: each layer keeps its bf16 input "
        f"({s['checkpoint_bytes']:.0f} bytes per token and unit of width) and one layer's activations are live "
        f"during its recompute.",
        f"- Micro batch {s['micro_batch']}, input length {s['input_length']}, decoder length {s['target_length']} "
        f"(span corruption), as configs/large.yaml; ZeRO-3 adds two layers' gathered bf16 weights.",
        f"- Compute: {large['flops_per_gpu_step'] / 1e12:.0f} TFLOP per GPU per step, 6 x the parameters each of "
        f"the {large['tokens_per_gpu_step']:,} tokens passes through (input tokens the encoder and the "
        f"cross-attention keys and values, target tokens the rest of the decoder and the vocabulary projection: "
        f"performer.models.training_flops)"
        + (
            " x 4/3 (activation checkpointing recomputes the forward, as configs/large.yaml sets)"
            if s["large_checkpointing"]
            else ""
        )
        + f" over MFU x {inputs['gemm_flop_rate'] / 1e12:.0f} TFLOP/s (the dense bf16 matmul rate measured on "
        f"the H200; an H100 has the same bf16 peak). Measured MFU of our FAVOR+ `medium` step at batch 1 "
        f"({mfu_points}), interpolated on log tokens per step: {inputs['mfu_used']:.1%}. That is a small "
        f"model at batch 1, dominated by kernel launches and the FAVOR+ op (attention-gpu: our fused op reaches "
        f"1-2% of the GEMM rate); a `large` step runs bigger matmuls, so the measured figure is a floor. The "
        f"second set of columns assumes the dense matmuls at MFU {s['assumed_mfu']:.0%} (what tuned dense "
        f"training reaches) and adds the FAVOR+ ops' own time scaled from attention-gpu.json: "
        f"{inputs['favor_seconds_per_token_head']['bidirectional'] * 1e9:.0f} ns (bidirectional) and "
        f"{inputs['favor_seconds_per_token_head']['causal'] * 1e9:.0f} ns (causal) per token and head, forward + "
        f"backward, at the longest measured length (65,536, where the op is not launch-bound), x 4/3 for "
        f"checkpointing: {large['favor_seconds_per_step'] * 1e3:.0f} ms per step, encoder self- and decoder "
        "cross-attention bidirectional over the inputs, decoder self-attention causal.",
        f"- Communication per step and GPU: bf16 ring collectives, 2 (N-1)/N x P bytes x 2 for ZeRO 0-2 "
        f"(all-reduce, or reduce-scatter + all-gather), 3 (N-1)/N x P x 2 for ZeRO-3 (weights gathered for "
        f"forward and backward, gradients reduce-scattered). zero3-offload adds, per GPU, PCIe copies of its "
        f"partition (8 bytes per parameter: bf16 gradients down, bf16 weights up three times) at "
        f"{s['pcie_gbs']:.0f} GB/s and the host's AdamW over it at {s['host_adam_params_per_s'] / 1e9:.2f}G "
        f"parameters/s per GPU (torch AdamW on the host cores serving one GPU), in the comm column.",
        f"- Bandwidth: within a node of {s['gpus_per_node']} GPUs NVLink/NVSwitch at {s['nvlink_gbs']:.0f} GB/s "
        f"bus bandwidth per GPU; across nodes InfiniBand, one 400 Gb/s NDR port per GPU, "
        f"{s['ib_gbs']:.0f} GB/s achieved bus bandwidth (the ring is as fast as its slowest link). Latency: "
        f"{s['hop_latency_us']:.0f} us x log2 N hops per collective, {s['collectives_zero012']} collectives per "
        f"step for ZeRO 0-2 (gradient buckets), {s['collectives_zero3']} for ZeRO-3 (a gather per module and "
        f"pass, 24 layers x 3 modules x 3 passes, coalesced by DeepSpeed's prefetch buckets).",
        "- Control plane: the small collectives of a step (step_overhead.json: "
        + ", ".join(f"{stage} {count:g}" for stage, count in inputs["small_collectives_per_step"].items())
        + f") at {s['hop_latency_us']:.0f} us x log2 N each, in the step (they sit between its phases); the "
        "store behind rendezvous and the hang watchdog takes one blocking wait per rank for the whole job "
        "(store_load.json), nothing per step.",
        f"- Checkpoints: every {s['checkpoint_every_s'] / 60:.0f} minutes of training, amortized over the steps "
        f"between; storage at {s['storage_gbs_per_node']:.0f} GB/s per node (shared by its GPUs), "
        f"{s['storage_aggregate_gbs']:.0f} GB/s for the whole filesystem, the same for reads; hashing adds "
        f"{inputs['checkpoint_hashing_overhead']:.1%} to DeepSpeed's write as the step loop sees it "
        "(checkpoint_io.json, largest size, hashed while written with the commit behind the loop). A save takes the "
        "busiest node's bytes over its bandwidth or the whole over the filesystem's, the longer, plus its files' "
        f"creation at {s['storage_files_per_s']:,.0f} files/s (the metadata server; one file per rank and stage "
        "role); a resume verifies every file (one read, spread) and loads (every rank reads the whole weights file "
        "at ZeRO-1/2, the whole checkpoint at ZeRO-0), opening the files at the same rate.",
        "- Step time = compute + communication: the trainer sets overlap_comm=False (launcher/ds_config.py); "
        "the 'comm overlapped' column is max(compute, communication), the bound with overlap. Weak scaling: "
        "the global batch grows with the GPUs (micro batch per GPU fixed, grad_accum 1).",
        "- Not modelled: stragglers, data loading, the optimizer step's own time, pipeline or tensor "
        "parallelism (the trainer is data-parallel only).",
    ]
    return "\n".join(lines) + "\n"


def control_table(results: dict) -> str:
    """Per stage and GPUs: the control plane's and the checkpoints' share of a step, and a resume."""
    rows = []
    for row in results["projections"]:
        if row["stage"] not in ("zero0", "zero1", "zero2", "zero3"):
            continue
        step = row["step_s_assumed"]
        rows.append(
            [
                row["stage"],
                f"{row['gpus']:,}",
                common.seconds(step),
                f"{row['control_collectives']:g} x {common.seconds(row['control_s'] / row['control_collectives'])} = "
                f"{common.seconds(row['control_s'])} ({row['control_s'] / step:.2%})",
                f"{row['checkpoint_bytes'] / 1e9:.1f} GB in {common.seconds(row['save_s'])}",
                f"{common.seconds(row['checkpoint_amortized_s'])} ({row['checkpoint_amortized_s'] / step:.2%})",
                common.seconds(row["resume_s"]),
                common.seconds(row["step_s_assumed_all_in"]),
            ]
        )
    header = ["ZeRO", "GPUs", "step", "small collectives", "checkpoint", "per step", "resume", "step, all in"]
    return common.table(header, rows, "lrrrrrrr")


def parser() -> argparse.ArgumentParser:
    """The options (every assumption) with their defaults; benchmarks/step_overhead.py projects with them too."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zero-memory", default="benchmarks/results/zero_memory.json")
    parser.add_argument("--model-step", default="benchmarks/results/model_step-gpu.json")
    parser.add_argument("--attention", default="benchmarks/results/attention-gpu.json")
    parser.add_argument("--gpus", type=lambda text: [int(n) for n in text.split(",")], default=[8, 64, 512, 4096])
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--reserve-fraction", type=float, default=0.10)
    parser.add_argument("--runtime-gib", type=float, default=1.5, help="CUDA context, NCCL buffers")
    parser.add_argument("--count-buffers", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--vocab", type=int, default=32_000)
    parser.add_argument("--layers", type=int, default=24, help="encoder (and decoder) layers of the size family")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--input-length", type=int, default=1024)
    parser.add_argument("--target-length", type=int, default=229, help="span corruption at 1024 inputs")
    parser.add_argument("--checkpoint-bytes", type=float, default=2.0, help="bytes per token and width kept per layer")
    parser.add_argument("--large-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--assumed-mfu", type=float, default=0.40)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbs", type=float, default=350.0)
    parser.add_argument("--ib-gbs", type=float, default=40.0)
    parser.add_argument("--hop-latency-us", type=float, default=10.0)
    parser.add_argument("--pcie-gbs", type=float, default=25.0, help="host <-> GPU, achieved, per GPU")
    parser.add_argument("--host-adam-params-per-s", type=float, default=3e8, help="host AdamW rate per GPU")
    parser.add_argument("--collectives-zero012", type=int, default=10)
    parser.add_argument("--collectives-zero3", type=int, default=216)
    parser.add_argument("--step-overhead", default="benchmarks/results/step_overhead.json")
    parser.add_argument("--checkpoint-io", default="benchmarks/results/checkpoint_io.json")
    parser.add_argument("--checkpoint-every-s", type=float, default=1800.0, help="seconds of training between saves")
    parser.add_argument("--storage-gbs-per-node", type=float, default=5.0, help="a node's write (and read) rate")
    parser.add_argument("--storage-aggregate-gbs", type=float, default=500.0, help="the filesystem's, all nodes")
    parser.add_argument("--storage-files-per-s", type=float, default=5000.0, help="file creates (or opens) per second")
    parser.add_argument("--name", default="scale_on_paper")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    results = {**compute(args), "machine": common.machine()}  # the machine for the commit and command
    common.publish(args.name, results, markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
