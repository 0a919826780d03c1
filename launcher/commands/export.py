"""`performer export`: a training checkpoint (any ZeRO stage) -> a fixed-feature safetensors export.

    performer export --checkpoint runs/tiny [--tag step00000300] --out runs/tiny/export [--dtype bf16]

ZeRO shards are consolidated with DeepSpeed's own fp32 consolidation (``zero_to_fp32``); a ZeRO-0
fp32 checkpoint already holds the whole module. The model and run configs come from the tag's
COMPLETE marker (JSON), the tokenizer from beside the training shards (its fingerprint checked
against the manifest), and the model card from the run's metrics.

DeepSpeed checkpoints are pickles: export only checkpoints you trust. The export itself holds no
pickle (safetensors + JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from launcher.checkpoint import CheckpointError, read_marker, resolve_resume_tag
from launcher.config import config_from_dict
from performer.models import is_projection_key
from performer.pretrained import DTYPES, SHORT_DTYPE_NAMES, dtype_named
from performer.redraw import RedrawSchedule


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="checkpoint -> safetensors export for fine-tuning",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, metavar="RUN_DIR", help="the run's train.output_dir")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    parser.add_argument("--out", required=True, metavar="EXPORT_DIR")
    parser.add_argument(
        "--dtype", choices=[*SHORT_DTYPE_NAMES, *DTYPES], default="fp32", help="weight dtype in the export"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: beside the shards)")
    parser.set_defaults(func=command)


def consolidated_state_dict(checkpoint_dir: Path, tag: str, run_config) -> dict[str, torch.Tensor]:
    """fp32 weights and buffers of the whole model from one checkpoint tag."""
    if run_config.zero.stage == 0 and run_config.precision == "fp32":
        # Trusted input only (pickle): the module state written by rank 0.
        states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {
            name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in states["module"].items()
        }
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints per-shard progress
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def find_tokenizer(run_config, explicit: str | None) -> Path | None:
    """The directory of the tokenizer the shards were written with: `explicit`, or the one beside
    them (None if there is none); it must load and have the fingerprint the manifest pins."""
    from data.shards import Manifest

    tokenizer = Manifest.load(run_config.data.train_manifest).tokenizer(explicit)
    return tokenizer.directory if tokenizer is not None else None


def trained_projection(marker: dict, run_config) -> dict:
    """The projection the checkpoint's last steps trained with: base seed (None = as stored), draw
    and trained steps. Markers before this record existed are read from the redraw schedule."""
    if marker.get("projection") is not None:
        return marker["projection"]
    # Swap was the only mode before the record existed.
    return RedrawSchedule(run_config.model.feature_redraw_interval, mode="swap").record(marker["step"], base_seed=None)


def with_trained_projections(
    state_dict: dict[str, torch.Tensor], model_config, model_kind: str, projection: dict
) -> dict[str, torch.Tensor]:
    """``state_dict`` with the projections of ``projection["draw"]``.

    Checkpoints written before redraws were moved after the save hold, at a redraw step, the draw
    made for the next step, which no step trained with; the draw that did is a function of
    (base seed, step), so it is drawn again here.
    """
    from performer.models import build_model

    draws = {name: tensor for name, tensor in state_dict.items() if name.endswith("projection_draw")}
    stored = {int(tensor[2]) for tensor in draws.values()}
    if not draws or stored == {projection["draw"]}:
        return state_dict
    base_seed = int(next(iter(draws.values()))[0])
    print(
        f"note: the checkpoint holds projection draw {sorted(stored)}, which no training step used "
        f"(saved before redraws followed the save); exporting draw {projection['draw']}, which steps "
        f"{projection['trained_steps']} trained with",
        file=sys.stderr,
    )
    with torch.random.fork_rng(devices=[]):
        model = build_model(model_kind, model_config)
    model.load_state_dict(state_dict)
    model.redraw_projection_matrices_(seed=base_seed, step=projection["draw"])
    redrawn = {name: tensor for name, tensor in model.state_dict().items() if is_projection_key(name)}
    return {**state_dict, **redrawn}


def model_card(run_dir: Path, marker: dict) -> dict:
    """Facts for the export's README: data, steps, tokens, last eval loss."""
    run_config = marker["run_config"]
    card = {
        "data": run_config["data"]["manifest"],
        "objective": run_config["data"]["objective"],
        "steps": marker["step"],
        "ranks": marker["world_size"],
        "precision": run_config["precision"],
        "zero stage": run_config["zero"]["stage"],
    }
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        records = [r for r in records if r.get("step", 0) <= marker["step"]]
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        if train:
            card["tokens"] = train[-1].get("tokens")
            card["final train loss"] = round(train[-1]["loss"], 4)
        if evals:
            card["eval loss"] = round(evals[-1]["loss"], 4)
            card["eval perplexity"] = round(evals[-1]["perplexity"], 2)
    return card


def export_checkpoint(
    run_dir: Path, out: Path, tag: str | None = None, dtype: str = "fp32", tokenizer: str | None = None
) -> Path:
    from performer.config import ModelConfig
    from performer.pretrained import check_out_dir, save_pretrained_from_state_dict

    checkpoint_dir = run_dir / "checkpoints"
    resolved = resolve_resume_tag(checkpoint_dir, tag or "auto")
    if resolved is None:
        raise CheckpointError(
            f"no complete checkpoint in {checkpoint_dir}: train first (performer pretrain) or check the path"
        )
    marker = read_marker(checkpoint_dir / resolved)
    run_config = config_from_dict(marker["run_config"])
    model_config = ModelConfig.from_dict(marker["model_config"])
    projection = trained_projection(marker, run_config)
    # What can fail on its own is checked before the consolidation (minutes for a large model).
    tokenizer_dir = find_tokenizer(run_config, tokenizer)
    check_out_dir(out)
    state_dict = consolidated_state_dict(checkpoint_dir, resolved, run_config)
    state_dict = with_trained_projections(state_dict, model_config, run_config.model.kind, projection)
    trained = projection["trained_steps"]
    blend = (projection["next_draw"], projection["blend_weight"]) if projection.get("blend_weight") else None
    return save_pretrained_from_state_dict(
        state_dict,
        model_config,
        run_config.model.kind,
        out,
        dtype=dtype_named(dtype),
        tokenizer_dir=tokenizer_dir,
        card=model_card(run_dir, marker),
        trained_steps=tuple(trained) if trained else None,
        blend=blend,
    )


def command(args) -> int:
    out = export_checkpoint(Path(args.checkpoint), Path(args.out), args.tag, args.dtype, args.tokenizer)
    print(f"exported {args.checkpoint} -> {out}")
    return 0
