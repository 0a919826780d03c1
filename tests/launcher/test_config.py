"""The typed run config (YAML layering, --set, validation, fingerprints) and the DeepSpeed JSON builder.

Pure unit tests: no DeepSpeed engine, no processes, no torch work; the whole file runs in about a second.

Shipped configs are found with a glob, so a new file in configs/ is exercised automatically. The rule
that tells them apart: a *base* config names a model (it has a top-level ``model:`` section, i.e. it
describes a whole run); every other file is an *overlay* (precision, ZeRO stage...) meant to be layered
on top of a base. Overlays are checked on top of tiny.yaml (fp32, ZeRO 1) and large.yaml (bf16, ZeRO 3).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from launcher.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    deep_merge,
    load_config,
    parse_override,
    save_config,
)
from launcher.ds_config import OWNED_KEYS, build_deepspeed_config, global_batch_size

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))


def _is_base(path: Path) -> bool:
    """A base config names a model (top-level `model:`); anything else is an overlay."""
    return "model" in (yaml.safe_load(path.read_text()) or {})


BASES = [path for path in CONFIG_FILES if _is_base(path)]
OVERLAYS = [path for path in CONFIG_FILES if not _is_base(path)]
OVERLAY_TARGETS = [CONFIG_DIR / "tiny.yaml", CONFIG_DIR / "large.yaml"]
COMBINATIONS = [[base] for base in BASES] + [[base, overlay] for base in OVERLAY_TARGETS for overlay in OVERLAYS]
RANKS = (2, 8)


def _combo_id(paths) -> str:
    return "+".join(path.stem for path in paths)


def _tiny(*overrides: str) -> RunConfig:
    return load_config([CONFIG_DIR / "tiny.yaml"], list(overrides))


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, dotted + ".")
        else:
            yield dotted, value


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ shipped configs


def test_shipped_configs_are_classified():
    names = {path.stem for path in BASES}, {path.stem for path in OVERLAYS}
    assert {"tiny", "small", "medium", "large"} <= names[0]
    assert {"zero1", "zero2", "zero3", "zero3-offload", "bf16", "fp16"} <= names[1]
    assert all(target in BASES for target in OVERLAY_TARGETS)


@pytest.mark.parametrize("paths", COMBINATIONS, ids=_combo_id)
def test_shipped_config_loads_and_builds(paths):
    config = load_config(paths)
    assert isinstance(config, RunConfig)
    if len(paths) == 2:  # every value the overlay sets wins over the base
        resolved = config.to_dict()
        for dotted, value in _leaves(yaml.safe_load(paths[1].read_text())):
            assert _lookup(resolved, dotted) == value, dotted
    for ranks in RANKS:
        ds = build_deepspeed_config(config, ranks)
        json.dumps(ds)  # plain JSON, as DeepSpeed reads it
        micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
        assert (micro, accum) == (config.train.micro_batch_size, config.train.grad_accum)
        assert ds["train_batch_size"] == micro * accum * ranks == global_batch_size(config, ranks)
        assert ds["zero_optimization"]["stage"] == config.zero.stage
        assert ds["bf16"]["enabled"] == (config.precision == "bf16")
        assert ds["fp16"]["enabled"] == (config.precision == "fp16")


@pytest.mark.parametrize("paths", COMBINATIONS, ids=_combo_id)
def test_shipped_config_round_trips(paths, tmp_path):
    config = load_config(paths)
    assert config_from_dict(config.to_dict()) == config
    save_config(config, tmp_path / "run" / "config.yaml")  # creates the parent directory
    reloaded = load_config([tmp_path / "run" / "config.yaml"])
    assert reloaded == config
    assert reloaded.fingerprint() == config.fingerprint()
    assert reloaded.model_fingerprint() == config.model_fingerprint()


# ------------------------------------------------------------------------------ layering and --set


def test_later_files_win_and_mappings_merge_key_by_key(tmp_path):
    first = _write(
        tmp_path,
        "a.yaml",
        "model:\n  preset: small\n  dropout: 0.1\n  d_model: 64\n  num_heads: 2\n"
        "optimizer:\n  betas: [0.9, 0.95]\n  lr: 0.5\n",
    )
    second = _write(tmp_path, "b.yaml", "model:\n  dropout: 0.2\n  d_model: 96\noptimizer:\n  betas: [0.8, 0.9]\n")
    config = load_config([first, second])
    assert config.model.preset == "small"  # kept from the first file
    assert config.model.dropout == 0.2  # the later file wins
    assert (config.model.d_model, config.model.num_heads) == (96, 2)  # merged key by key
    assert config.model.num_encoder_layers == 4  # the preset fills what no file sets
    assert config.optimizer.betas == [0.8, 0.9]  # lists are replaced, not merged
    assert config.optimizer.lr == 0.5
    assert load_config([second, first]).model.dropout == 0.1


def test_overlay_keeps_the_rest_of_the_base():
    config = load_config([CONFIG_DIR / "tiny.yaml", CONFIG_DIR / "zero2.yaml"])
    assert (config.zero.stage, config.zero.offload) == (2, "none")
    assert (config.model.preset, config.optimizer.lr, config.train.max_steps, config.precision) == (
        "tiny",
        2e-3,
        600,
        "fp32",
    )


def test_deep_merge_does_not_mutate_its_inputs():
    base = {"deepspeed": {"a": {"b": 64}}, "seed": 0}
    update = {"deepspeed": {"a": {"c": 2}}, "seed": 1}
    snapshot = copy.deepcopy((base, update))
    assert deep_merge(base, update) == {"deepspeed": {"a": {"b": 64, "c": 2}}, "seed": 1}
    assert (base, update) == snapshot


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3", 3),
        ("0.5", 0.5),
        ("3.0e-4", 3e-4),
        ("null", None),
        ("~", None),
        ("[1, 2]", [1, 2]),
        ("true", True),
        ("false", False),
        ("abc", "abc"),
        ("'3'", "3"),
        ("{a: 1}", {"a": 1}),
        ("", ""),
        ("a=b", "a=b"),
    ],
)
def test_parse_override_values_are_yaml(raw, expected):
    parsed = parse_override(f"a.b.c={raw}")
    assert parsed == {"a": {"b": {"c": expected}}}
    assert type(parsed["a"]["b"]["c"]) is type(expected)


@pytest.mark.parametrize("bad", ["train.max_steps", "=3", "...=3"])
def test_parse_override_rejects_malformed(bad):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(bad)


def test_set_overrides_files_in_order():
    config = _tiny(
        "train.max_steps=50",
        "optimizer.lr=1",
        "train.time_budget_s=null",
        "optimizer.betas=[0.8, 0.9]",
        "log.tensorboard=false",
        "train.max_steps=70",
    )
    assert config.train.max_steps == 70  # the later --set wins
    assert config.optimizer.lr == 1.0 and type(config.optimizer.lr) is float  # ints widen for float fields
    assert config.train.time_budget_s is None
    assert config.optimizer.betas == [0.8, 0.9]
    assert config.log.tensorboard is False


def test_set_model_fields_over_files_and_preset(tmp_path):
    base = _write(tmp_path, "base.yaml", "model:\n  num_heads: 2\n  position: absolute\n")
    config = load_config([CONFIG_DIR / "tiny.yaml", base], ["model.d_model=64", "model.position=rotary"])
    assert (config.model.num_heads, config.model.position, config.model.d_model) == (2, "rotary", 64)
    assert config.model.preset == "tiny" and config.model.num_encoder_layers == 2


def test_preset_fills_the_model_fields_not_set():
    assert load_config([], []).model.d_model == 128  # the default preset, tiny
    config = _tiny("model.preset=large")
    assert (config.model.d_model, config.model.num_heads, config.model.num_decoder_layers) == (1024, 16, 12)
    assert _tiny("model.preset=large", "model.d_model=512").model.d_model == 512


@pytest.mark.parametrize(
    "key", ["vocab_size", "pad_id", "decoder_start_id", "projection_seed", "auto_check_redraw", "num_classes"]
)
def test_fields_the_trainer_derives_are_refused_with_their_source(key):
    with pytest.raises(ConfigError, match=rf"model\.{key} is set by the trainer from .*; remove it"):
        _tiny(f"model.{key}=1")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("model.redraw_interval=5", "model.feature_redraw_interval"),
        ("model.activation_checkpointing=1", "model.gradient_checkpointing"),
        ("model.overrides.d_model=64", "directly under model"),
    ],
)
def test_renamed_keys_name_their_new_name(old, new):
    with pytest.raises(ConfigError, match="was renamed: use") as caught:
        _tiny(old)
    assert new in str(caught.value)


def test_configs_saved_before_the_rename_still_load():
    """Checkpoints and run directories written with the old model section resume and export."""
    values = _tiny().to_dict()
    old_model = {
        "preset": "tiny",
        "kind": "seq2seq",
        "attention_type": "favor",
        "nb_features": None,
        "feature_map": "favor++",
        "dropout": 0.0,
        "redraw_interval": 7,
        "redraw_mode": "swap",
        "activation_checkpointing": 1,
        "overrides": {"d_model": 64},
    }
    config = config_from_dict({**values, "model": old_model})
    assert (config.model.feature_redraw_interval, config.model.gradient_checkpointing) == (7, 1)
    assert (config.model.d_model, config.model.num_heads, config.model.redraw_mode) == (64, 4, "swap")


def test_set_deepspeed_passthrough_merges():
    config = _tiny("deepspeed.flops_profiler.enabled=true", "deepspeed.flops_profiler.profile_step=3")
    assert config.deepspeed == {"flops_profiler": {"enabled": True, "profile_step": 3}}


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("override", "unknown", "hint"),
    [
        ("trian.max_steps=5", "trian", "train"),
        ("precison=bf16", "precison", "precision"),
        ("train.max_step=5", "train.max_step", "train.max_steps"),
        ("model.d_modle=64", "model.d_modle", "model.d_model"),
        ("optimizer.weight_decy=0.1", "optimizer.weight_decy", "optimizer.weight_decay"),
    ],
)
def test_unknown_key_has_did_you_mean_with_full_dotted_key(override, unknown, hint):
    with pytest.raises(ConfigError) as caught:
        _tiny(override)
    message = str(caught.value)
    assert f"unknown config key {unknown!r}" in message
    assert f"did you mean {hint!r}" in message


def test_unknown_key_in_a_file_without_close_match_lists_known_keys(tmp_path):
    path = _write(tmp_path, "odd.yaml", "zero:\n  stage: 1\n  qqqqqq: 2\n")
    with pytest.raises(
        ConfigError,
        match=r"'zero\.qqqqqq'.*known here: bucket_elements, offload, overlap_comm, persistence_threshold, stage",
    ) as caught:
        load_config([path])
    assert "did you mean" not in str(caught.value)


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.max_steps=abc", "train.max_steps", "int"),
        ("optimizer.lr=[1]", "optimizer.lr", "float"),
        ("optimizer.lr=abc", "optimizer.lr", "float"),
        ("train.max_steps=true", "train.max_steps", "int"),  # bool is not an int here
        ("seed=false", "seed", "int"),
        ("train.max_steps=1.5", "train.max_steps", "int"),
        ("optimizer.lr=true", "optimizer.lr", "float"),
        ("train.global_batch_size=true", "train.global_batch_size", "int"),
        ("data.verify_sha256=1", "data.verify_sha256", "bool"),
        ("data.manifest=5", "data.manifest", "str"),
        ("optimizer.betas=0.9", "optimizer.betas", "list"),
        ("model.num_heads=[4]", "model.num_heads", "int"),
        ("deepspeed=[1]", "deepspeed", "dict"),
    ],
)
def test_wrong_type_names_the_key(override, key, expected):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} must be of type .*{expected}"):
        _tiny(override)


@pytest.mark.parametrize("override", ["model=5", "model=0", "train=[]", "zero=false"])
def test_a_section_must_be_a_mapping(override):
    section = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{section} must be a mapping"):
        _tiny(override)


def test_empty_section_means_defaults(tmp_path):
    path = _write(tmp_path, "empty.yaml", "log:\n# nothing set\n")
    assert load_config([path]).log == RunConfig().log


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("precision=fp8", "precision='fp8'; choose one of fp32, bf16, fp16"),
        ("model.attention_type=linear", "model.attention_type='linear'"),
        ("zero.stage=4", "zero.stage=4"),
        ("zero.offload=nvme", "zero.offload='nvme'"),
        ("train.max_steps=0", "train.max_steps must be >= 1, got 0"),
        ("train.grad_accum=0", "train.grad_accum must be >= 1"),
        ("checkpoint.keep=0", "checkpoint.keep must be >= 1"),
        ("model.gradient_checkpointing=-1", "model.gradient_checkpointing"),
    ],
)
def test_invalid_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as caught:
        _tiny(override)
    assert needle in str(caught.value)


def test_impossible_batch_triad_names_all_three_numbers():
    config = _tiny("train.micro_batch_size=4", "train.grad_accum=3", "train.global_batch_size=100")
    with pytest.raises(ConfigError) as caught:
        build_deepspeed_config(config, 2)
    message = str(caught.value)
    for part in (
        "train.global_batch_size=100",
        "train.micro_batch_size (4)",
        "train.grad_accum (3)",
        "ranks (2)",
        "= 24",
    ):
        assert part in message


def test_matching_global_batch_size_is_accepted_for_its_rank_count_only():
    config = _tiny("train.micro_batch_size=4", "train.grad_accum=3", "train.global_batch_size=24")
    assert build_deepspeed_config(config, 2)["train_batch_size"] == 24
    with pytest.raises(ConfigError, match="ranks \\(8\\) = 96"):
        build_deepspeed_config(config, 8)


@pytest.mark.parametrize("key", OWNED_KEYS)
def test_passthrough_colliding_with_typed_key_is_refused(key):
    config = _tiny(f"deepspeed.{key}={{}}")
    with pytest.raises(ConfigError, match=rf"deepspeed\.{key} is set by the typed config"):
        build_deepspeed_config(config, 2)


def test_harmless_passthrough_appears_in_the_json():
    config = _tiny("deepspeed.communication_data_type=fp32", "deepspeed.flops_profiler.enabled=true")
    ds = build_deepspeed_config(config, 2)
    assert ds["communication_data_type"] == "fp32"
    assert ds["flops_profiler"] == {"enabled": True}
    assert config.deepspeed == {"communication_data_type": "fp32", "flops_profiler": {"enabled": True}}  # not mutated


def test_passthrough_may_replace_untyped_defaults():
    ds = build_deepspeed_config(_tiny("deepspeed.steps_per_print=10", "deepspeed.wall_clock_breakdown=true"), 2)
    assert (ds["steps_per_print"], ds["wall_clock_breakdown"]) == (10, True)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_all_below_stage_3_is_refused(stage):
    with pytest.raises(ConfigError, match="zero.offload=all .* needs zero.stage=3"):
        _tiny(f"zero.stage={stage}", "zero.offload=all")


def test_offload_optimizer_without_zero_is_refused():
    # Stage 0 builds no ZeRO optimizer, so DeepSpeed would silently keep the states on the device.
    with pytest.raises(ConfigError, match="zero.offload=optimizer needs zero.stage >= 1"):
        _tiny("zero.stage=0", "zero.offload=optimizer")


@pytest.mark.parametrize(
    ("overrides", "fix"),
    [
        (["model.kind=lm"], "set data.objective=causal_lm"),
        (["data.objective=causal_lm"], "set data.objective=span_corruption"),
        (["model.kind=lm", "data.objective=mlm"], "set data.objective=causal_lm"),
    ],
)
def test_wrong_objective_for_model_kind_is_refused_with_the_fix(overrides, fix):
    with pytest.raises(ConfigError, match="does not train model.kind") as caught:
        _tiny(*overrides)
    assert fix in str(caught.value)


def test_lm_with_causal_objective_loads():
    config = _tiny("model.kind=lm", "data.objective=causal_lm")
    assert (config.model.kind, config.data.objective) == ("lm", "causal_lm")


def test_missing_config_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as caught:
        load_config([CONFIG_DIR / "tiny.yaml", missing])
    assert str(missing) in str(caught.value)


def test_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config([tmp_path])


def test_invalid_yaml_is_named(tmp_path):
    path = _write(tmp_path, "broken.yaml", "model:\n  preset: [tiny\n")
    with pytest.raises(ConfigError, match="is not valid YAML") as caught:
        load_config([path])
    assert str(path) in str(caught.value)


def test_non_mapping_yaml_is_named(tmp_path):
    path = _write(tmp_path, "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping") as caught:
        load_config([path])
    assert str(path) in str(caught.value)


def test_empty_file_is_an_empty_layer(tmp_path):
    path = _write(tmp_path, "empty.yaml", "# nothing\n")
    assert load_config([CONFIG_DIR / "tiny.yaml", path]) == _tiny()
    # A file with no bytes at all is more likely a failed copy than a deliberate layer.
    with pytest.raises(ConfigError, match="is empty"):
        load_config([CONFIG_DIR / "tiny.yaml", _write(tmp_path, "zero.yaml", "")])


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------ DeepSpeed JSON content


def test_tiny_json_content():
    ds = build_deepspeed_config(_tiny(), 2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16,
        8,
        1,
    )
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": False, "contiguous_gradients": True}
    assert ds["bf16"] == {"enabled": False}
    assert ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["type"] == "AdamW"
    params = ds["optimizer"]["params"]
    assert params["lr"] == 2e-3 and params["betas"] == [0.9, 0.98] and params["eps"] == 1e-8
    assert params["weight_decay"] == 0.01
    assert params["torch_adam"] is True and params["adam_w_mode"] is True
    assert "scheduler" not in ds  # the trainer sets each step's rate (launcher/schedule.py)
    assert "zero_force_ds_cpu_optimizer" not in ds


def test_optimizer_and_schedule_sections_flow_into_the_json():
    config = _tiny(
        "optimizer.lr=0.5",
        "optimizer.betas=[0.8, 0.95]",
        "optimizer.eps=1.0e-6",
        "optimizer.weight_decay=0",
        "optimizer.grad_clip=0",
        "train.max_steps=1234",
        "schedule.warmup_steps=77",
        "schedule.min_lr_ratio=0.25",
    )
    ds = build_deepspeed_config(config, 8)
    params = ds["optimizer"]["params"]
    assert (params["lr"], params["betas"], params["eps"], params["weight_decay"]) == (0.5, [0.8, 0.95], 1e-6, 0.0)
    assert ds["gradient_clipping"] == 0.0  # 0 = off in DeepSpeed too
    params["betas"].append(0.0)  # the JSON holds its own copy
    assert config.optimizer.betas == [0.8, 0.95]


def test_schedule_rates_follow_the_formula_at_its_landmarks():
    from launcher.schedule import learning_rate

    def rate(step, warmup=30, max_steps=600):
        return learning_rate(step, 2e-3, warmup, max_steps, 0.1)

    assert rate(1) == pytest.approx(2e-3 / 30) and rate(1) > 0  # step 1 learns
    assert rate(10) == pytest.approx(6.6667e-4, rel=1e-4)
    assert rate(30) == 2e-3  # the peak, exactly
    assert rate(31) == pytest.approx(2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi / 570)))
    assert rate(315) == pytest.approx(2e-4 + 1.8e-3 * 0.5)  # half way down the cosine
    assert rate(600) == pytest.approx(2e-4, abs=1e-18)  # the floor, exactly at max_steps
    rates = [rate(step) for step in range(1, 601)]
    assert all(a < b for a, b in zip(rates[:29], rates[1:30])) and all(a > b for a, b in zip(rates[29:], rates[30:]))
    # Warmup longer than training: the rate climbs to the peak at the last step.
    assert learning_rate(10, 1.0, 1000, 10, 0.1) == 1.0 and learning_rate(5, 1.0, 1000, 10, 0.1) == 0.5
    with pytest.raises(ValueError, match="count from 1"):
        rate(0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.no_decay=[norms, gains]", "gains"),
        ("schedule.min_lr_ratio=1.5", "min_lr_ratio"),
        ("schedule.warmup_steps=-1", "warmup_steps"),
    ],
)
def test_bad_optimizer_and_schedule_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        _tiny(override)


def test_grad_accum_in_the_triad():
    ds = build_deepspeed_config(_tiny("train.micro_batch_size=3", "train.grad_accum=5"), 8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        120,
        3,
        5,
    )


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_flags(precision):
    ds = build_deepspeed_config(_tiny(f"precision={precision}"), 2)
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")


def test_fp16_uses_dynamic_loss_scaling():
    config = load_config([CONFIG_DIR / "tiny.yaml", CONFIG_DIR / "fp16.yaml"])
    fp16 = build_deepspeed_config(config, 2)["fp16"]
    assert fp16["enabled"] is True
    assert fp16["loss_scale"] == 0  # 0 = dynamic in DeepSpeed
    assert fp16["initial_scale_power"] == 16 and fp16["loss_scale_window"] == 1000
    assert fp16["hysteresis"] == 2 and fp16["min_loss_scale"] == 1


@pytest.mark.parametrize(
    ("stage", "offload", "expected"),
    [
        (0, "none", {"stage": 0}),
        (1, "none", {"stage": 1, "overlap_comm": False, "contiguous_gradients": True}),
        (2, "none", {"stage": 2, "overlap_comm": False, "contiguous_gradients": True}),
        (
            2,
            "optimizer",
            {
                "stage": 2,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "offload_optimizer": {"device": "cpu", "pin_memory": False},
            },
        ),
        (
            3,
            "none",
            {
                "stage": 3,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "stage3_gather_16bit_weights_on_model_save": True,
            },
        ),
        (
            3,
            "optimizer",
            {
                "stage": 3,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "offload_optimizer": {"device": "cpu", "pin_memory": False},
                "stage3_gather_16bit_weights_on_model_save": True,
            },
        ),
        (
            3,
            "all",
            {
                "stage": 3,
                "overlap_comm": False,
                "contiguous_gradients": True,
                "offload_optimizer": {"device": "cpu", "pin_memory": False},
                "offload_param": {"device": "cpu", "pin_memory": False},
                "stage3_gather_16bit_weights_on_model_save": True,
            },
        ),
    ],
)
def test_zero_section(stage, offload, expected):
    ds = build_deepspeed_config(_tiny(f"zero.stage={stage}", f"zero.offload={offload}"), 2)
    assert ds["zero_optimization"] == expected
    # torch's AdamW is kept with offloaded states; without offload the key is left to DeepSpeed.
    if offload == "none":
        assert "zero_force_ds_cpu_optimizer" not in ds
    else:
        assert ds["zero_force_ds_cpu_optimizer"] is False


def test_shipped_zero3_offload_overlay_on_large():
    config = load_config([CONFIG_DIR / "large.yaml", CONFIG_DIR / "zero3-offload.yaml"])
    ds = build_deepspeed_config(config, 8)
    zero = ds["zero_optimization"]
    assert (
        zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu" and zero["offload_optimizer"]["device"] == "cpu"
    )
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 8 * 1 * 8


# ------------------------------------------------------------------------------ fingerprints


def _mutated(value):
    """A different value of the same kind (validation is bypassed: fingerprints only hash to_dict())."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.5
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 7
    if isinstance(value, (list, tuple)):
        return [*value, 0.5]
    if isinstance(value, dict):
        return {**value, "extra": 1}
    raise AssertionError(f"no mutation for {value!r}")


def _every_leaf_field():
    """Every setting a config file can hold (the model's derived fields are the trainer's)."""
    for top, value in RunConfig().to_dict().items():
        if isinstance(value, dict) and top != "deepspeed":
            yield from (f"{top}.{inner}" for inner in value)
        else:
            yield top


def _with(config: RunConfig, dotted: str, value) -> RunConfig:
    changed = copy.deepcopy(config)
    *sections, name = dotted.split(".")
    target = changed
    for section in sections:
        target = getattr(target, section)
    setattr(target, name, value)
    return changed


def test_fingerprint_is_stable_for_equal_configs():
    first, second = _tiny(), _tiny()
    assert first == second and first is not second
    assert first.fingerprint() == second.fingerprint() == _tiny().fingerprint()
    assert len(first.fingerprint()) == 64
    # Mapping order does not matter.
    a = _tiny("deepspeed.a=1", "deepspeed.b=2", "model.d_model=64", "model.num_heads=2")
    b = _tiny("deepspeed.b=2", "deepspeed.a=1", "model.num_heads=2", "model.d_model=64")
    assert a == b and a.fingerprint() == b.fingerprint() and a.model_fingerprint() == b.model_fingerprint()


@pytest.mark.parametrize("key", ["train.time_budget_s", "log.peak_flops_per_rank", "optimizer.lr", "dist.timeout_s"])
def test_fingerprint_does_not_depend_on_int_or_float_spelling(key):
    as_int, as_float = _tiny(f"{key}=60"), _tiny(f"{key}=60.0")
    assert as_int == as_float
    assert as_int.fingerprint() == as_float.fingerprint()
    assert config_from_dict(as_int.to_dict()).fingerprint() == as_int.fingerprint()


@pytest.mark.parametrize("key", list(_every_leaf_field()))
def test_fingerprint_changes_with_any_value(key):
    config = _tiny()
    changed = _with(config, key, _mutated(_lookup(config.to_dict(), key)))
    assert changed.fingerprint() != config.fingerprint()


@pytest.mark.parametrize(
    "override",
    [
        "model.dropout=0.3",
        "model.feature_redraw_interval=7",
        "model.redraw_mode=swap",
        "model.gradient_checkpointing=2",
        "train.max_steps=9",
        "optimizer.lr=0.1",
        "precision=bf16",
        "zero.stage=3",
        "seed=5",
        "data.input_length=64",
    ],
)
def test_model_fingerprint_ignores_what_does_not_shape_parameters(override):
    config, changed = _tiny(), _tiny(override)
    assert changed.fingerprint() != config.fingerprint()
    assert changed.model_fingerprint() == config.model_fingerprint()


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.preset=small"],
        ["model.kind=lm", "data.objective=causal_lm"],
        ["model.attention_type=softmax"],
        ["model.d_model=64"],
        ["model.nb_features=32"],
        ["model.feature_map=favor+"],
    ],
)
def test_model_fingerprint_changes_with_what_shapes_parameters(overrides):
    assert _tiny(*overrides).model_fingerprint() != _tiny().model_fingerprint()


# ------------------------------------------------------------------------------ round trips


def test_round_trip_with_every_field_set(tmp_path):
    config = _tiny(
        "model.d_model=64",
        "model.position=absolute",
        "model.nb_features=16",
        "data.eval_manifest=runs/data/heldout",
        "train.global_batch_size=16",
        "train.time_budget_s=30",
        "log.peak_flops_per_rank=1.0e+12",
        "deepspeed.communication_data_type=fp32",
        "zero.offload=optimizer",
    )
    assert config_from_dict(config.to_dict()) == config
    save_config(config, tmp_path / "config.yaml")
    assert load_config([tmp_path / "config.yaml"]) == config
    assert load_config([tmp_path / "config.yaml"]).fingerprint() == config.fingerprint()


def test_to_dict_is_a_detached_copy():
    config = _tiny("model.d_model=64")
    values = config.to_dict()
    values["model"]["d_model"] = 1
    values["optimizer"]["betas"].append(0.0)
    assert config.model.d_model == 64 and config.optimizer.betas == [0.9, 0.98]


def test_config_from_dict_validates():
    values = _tiny().to_dict()
    values["train"]["max_step"] = 5
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        config_from_dict(values)


def test_yaml_1_1_exponent_floats_are_numbers_in_float_fields_only():
    # PyYAML reads `1e-3` (no exponent sign) as a string; a float field takes it as the number.
    config = load_config([], ["optimizer.lr=1e-3", "log.peak_flops_per_rank=2e12"])
    assert config.optimizer.lr == 0.001 and config.log.peak_flops_per_rank == 2e12
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config([], ["train.max_steps=1e3"])
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load_config([], ["optimizer.lr=fast"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_bucket_and_persistence_reach_deepspeed_only_where_they_apply(stage):
    default = build_deepspeed_config(_tiny(f"zero.stage={stage}"), 2)["zero_optimization"]
    assert not {
        "reduce_bucket_size",
        "allgather_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
    } & set(default)  # null: DeepSpeed's own defaults
    zero = build_deepspeed_config(
        _tiny(f"zero.stage={stage}", "zero.bucket_elements=65536", "zero.persistence_threshold=2560"), 2
    )["zero_optimization"]
    if stage == 0:
        assert set(zero) == {"stage"}
    else:
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 65536
    assert zero.get("stage3_prefetch_bucket_size") == (65536 if stage == 3 else None)
    assert zero.get("stage3_param_persistence_threshold") == (2560 if stage == 3 else None)


@pytest.mark.parametrize("setting", ["zero.bucket_elements=0", "zero.persistence_threshold=-1"])
def test_zero_bucket_and_persistence_must_be_sensible(setting):
    with pytest.raises(ConfigError, match=setting.split("=")[0].replace(".", r"\.")):
        _tiny(setting)


def test_readme_configs_section_lists_each_setting_once():
    """The README's Configs section names every setting a file can hold, each once, and no other."""
    import re

    readme = (CONFIG_DIR.parent / "README.md").read_text()
    section = readme[readme.index("## Configs") :]
    section = section[: section.index("\n## ", 1)]
    listed = []
    for prefix, names in re.findall(r"`([a-z_]+)\.\{([a-z0-9_,]+)\}`", section):
        listed += [f"{prefix}.{name}" for name in names.split(",")]
    listed += [name for name in ("seed", "precision") if f"`{name}`" in section]
    expected = [key for key in _every_leaf_field() if key != "deepspeed"]
    assert sorted(listed) == sorted(expected)
    assert len(listed) == len(set(listed)), [key for key in listed if listed.count(key) > 1]


@pytest.mark.parametrize("weight", [0, -1.5, ".nan"])
def test_a_mixture_source_without_a_positive_weight_is_refused_with_its_key(weight):
    with pytest.raises(ConfigError, match=r"data\.sources\[1\].*weights must be positive"):
        load_config([CONFIG_DIR / "tiny.yaml"], [f"data.sources=[{{manifest: a}}, {{manifest: b, weight: {weight}}}]"])


# ------------------------------------------------------------------------------ the default number of features


@pytest.mark.parametrize(
    ("overrides", "features"),
    [
        ([], 256),  # tiny: head dim 32, where round(D ln D) = 111 trains more than 5% above softmax
        (["model.preset=small"], 266),  # head dim 64: the paper's round(D ln D)
        (["model.d_model=64"], 256),  # head dim 16: never fewer than 256
        (["model.nb_features=64"], 64),  # a number given is kept
        (["model.nb_features=null"], None),  # null: the library's round(D ln D), as configs saved before
    ],
)
def test_the_trainer_writes_its_default_number_of_features_into_the_config(overrides, features):
    config = _tiny(*overrides)
    assert config.model.nb_features == features
    assert config.to_dict()["model"]["nb_features"] == features
    assert config_from_dict(config.to_dict()) == config  # a saved config keeps its number (or its null)
    assert config.model.model_config(vocab_size=64).stack_params("encoder")["nb_features"] == features


def test_a_run_saved_with_the_old_default_is_refused_by_name_and_resumes_with_null():
    """Configs saved before the default became a number hold null (round(D ln D) = 111 at head dim
    32): resuming one with today's default names the key; nb_features=null resumes it."""
    saved = _tiny().to_dict()
    saved["model"]["nb_features"] = None
    old = config_from_dict(saved)
    assert old.model.nb_features is None
    assert old.model_fingerprint() != _tiny().model_fingerprint()
    assert old.model_fingerprint() == _tiny("model.nb_features=null").model_fingerprint()
