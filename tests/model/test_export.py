"""Exports: safetensors round trips, fixed projections, ties, atomic writes, clear errors, fine-tuning."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import performer
from performer import hf_files
from performer.config import preset
from performer.models import build_model
from performer.pretrained import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ExportError,
    save_pretrained_from_state_dict,
)

# Tiny models gain nothing from threads, and on a busy 2-core machine two threads crawl.
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 61
KINDS = ["seq2seq", "lm", "encoder"]
REPO_ROOT = Path(__file__).resolve().parents[2]


def _config(**overrides):
    values = dict(
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout=0.0,
        feature_redraw_interval=1,
    )
    values.update(overrides)
    return preset("tiny", **values)


def _batch(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    batch = dict(input_ids=ids, attention_mask=mask)
    if kind == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(5, VOCAB, (2, 5), generator=generator)
    return batch


def _logits(model, kind):
    with torch.no_grad():
        return model(**_batch(kind)).logits


def _projections(model) -> list[torch.Tensor]:
    return [attention.projection.clone() for attention in model.favor_attentions()]


def _export(tmp_path, kind="seq2seq", attention_type="favor", **save_kwargs):
    model = build_model(kind, _config(attention_type=attention_type)).eval()
    out = performer.save_pretrained(model, tmp_path / "export", model_kind=kind, **save_kwargs)
    return model, out


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("attention_type", ["favor", "softmax"])
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_round_trip_gives_bitwise_equal_logits(tmp_path, kind, attention_type):
    model, out = _export(tmp_path, kind, attention_type)
    loaded = performer.from_pretrained(out)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(_logits(loaded, kind), _logits(model, kind))
    for name, tensor in model.state_dict().items():
        if not name.endswith("projection_fixed"):
            assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_export_is_close_and_keeps_projections_in_float32(tmp_path, kind):
    model, out = _export(tmp_path, kind, dtype=torch.bfloat16)
    assert json.loads((out / CONFIG_FILE).read_text())["dtype"] == "bfloat16"
    loaded = performer.from_pretrained(out)
    assert loaded.embedding.tokens.weight.dtype == torch.bfloat16
    assert all(attention.projection.dtype == torch.float32 for attention in loaded.favor_attentions())
    assert all(torch.equal(a, b) for a, b in zip(_projections(loaded), _projections(model)))
    reference = _logits(model, kind)
    assert torch.allclose(_logits(loaded, kind).float(), reference, atol=0.1 * reference.abs().max().item())
    upcast = performer.from_pretrained(out, dtype=torch.float32)
    weight = model.embedding.tokens.weight
    assert upcast.embedding.tokens.weight.dtype == torch.float32
    assert torch.equal(upcast.embedding.tokens.weight, weight.to(torch.bfloat16).float())


def test_export_leaves_the_model_it_was_given_untouched(tmp_path):
    model = build_model("seq2seq", _config())
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    performer.save_pretrained(model, tmp_path / "export", model_kind="seq2seq", dtype=torch.bfloat16)
    assert model.training and model.decoder.auto_check_redraw
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not any(bool(attention.projection_fixed) for attention in model.favor_attentions())


def test_loading_leaves_the_global_random_state_alone(tmp_path):
    _, out = _export(tmp_path)
    state = torch.get_rng_state()
    performer.from_pretrained(out)
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------ projections


def test_projections_are_stored_fixed_and_never_redrawn_after_loading(tmp_path):
    model, out = _export(tmp_path, "seq2seq")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["model"]["auto_check_redraw"] is False and config["model"]["feature_redraw_interval"] is None
    assert config["projections"]["fixed"] is True and config["projections"]["dtype"] == "float32"
    from safetensors.torch import load_file

    stored = load_file(str(out / WEIGHTS_FILE))
    flags = [value for name, value in stored.items() if name.endswith("projection_fixed")]
    assert flags and all(bool(flag) for flag in flags)

    loaded = performer.from_pretrained(out)
    expected = _projections(model)
    assert all(torch.equal(a, b) for a, b in zip(_projections(loaded), expected))
    # Even a user who switches automatic redraw back on and trains gets the same features...
    for owner in (loaded, loaded.encoder, loaded.decoder):
        owner.auto_check_redraw, owner.feature_redraw_interval = True, 1
    loaded.train()
    for _ in range(3):
        loaded(**_batch("seq2seq")).logits.sum().backward()
    # ... and so does an explicit redraw.
    loaded.redraw_projection_matrices_(seed=123, step=7)
    assert all(torch.equal(a, b) for a, b in zip(_projections(loaded), expected))


def test_state_dict_export_needs_the_projections(tmp_path):
    model = build_model("seq2seq", _config())
    params_only = dict(model.named_parameters())
    with pytest.raises(ExportError, match="no FAVOR\\+ projection buffers.*include.*buffers"):
        save_pretrained_from_state_dict(params_only, model.config, "seq2seq", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    # The fixed flags alone may be absent, and a wrapper's "module." prefix is removed.
    state = {
        f"module.{name}": value for name, value in model.state_dict().items() if not name.endswith("projection_fixed")
    }
    out = save_pretrained_from_state_dict(state, model.config, "seq2seq", tmp_path / "export")
    model.eval()
    assert torch.equal(_logits(performer.from_pretrained(out), "seq2seq"), _logits(model, "seq2seq"))


def test_softmax_state_dict_export_needs_no_buffers(tmp_path):
    model = build_model("lm", _config(attention_type="softmax")).eval()
    out = save_pretrained_from_state_dict(dict(model.named_parameters()), model.config, "lm", tmp_path / "e")
    assert torch.equal(_logits(performer.from_pretrained(out), "lm"), _logits(model, "lm"))


# ------------------------------------------------------------------------------ tied weights


def test_tied_embeddings_are_still_tied_after_loading(tmp_path):
    _, out = _export(tmp_path, "seq2seq")
    loaded = performer.from_pretrained(out)
    assert loaded.lm_head is None  # the head is the embedding matrix itself
    with torch.no_grad():
        before = _logits(loaded, "seq2seq")
        loaded.embedding.tokens.weight[7] += 1.0
    assert not torch.equal(_logits(loaded, "seq2seq")[..., 7], before[..., 7])


def test_shared_tensors_are_stored_once_and_retied(tmp_path):
    # An untied head tied by hand (as some fine-tuning code does): safetensors refuses shared
    # tensors, so the export stores one and loading makes the two names one Parameter again.
    model = build_model("lm", _config(tie_embeddings=False)).eval()
    model.lm_head.weight = model.embedding.tokens.weight
    out = performer.save_pretrained(model, tmp_path / "export", model_kind="lm")
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["tied_weights"] == {"lm_head.weight": "embedding.tokens.weight"}
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_FILE), "pt") as stored:
        assert "lm_head.weight" not in stored.keys()
    loaded = performer.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.embedding.tokens.weight
    assert torch.equal(_logits(loaded, "lm"), _logits(model, "lm"))


# ------------------------------------------------------------------------------ files


def test_export_layout_has_no_pickle_and_no_leftovers(tmp_path):
    from data.tokenizer import TokenizerConfig, train_tokenizer

    tokenizer = tmp_path / "tok"
    texts = [
        "def add(a, b):\n    return a + b\n",
        "class Point:\n    x: int = 0\n",
        "the quick brown fox jumps over the lazy dog\n",
    ]
    texts *= 20
    train_tokenizer(texts, TokenizerConfig(vocab_size=320, num_sentinels=20, num_threads=1), tokenizer)
    model = build_model("seq2seq", _config(vocab_size=320)).eval()
    card = {"data": Path("stdlib"), "steps": 300, "eval loss": torch.tensor(2.5)}
    out = performer.save_pretrained(
        model, tmp_path / "export", model_kind="seq2seq", tokenizer_dir=tokenizer, card=card
    )
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    # What transformers reads (tests/model/test_hf_export.py), remote code with its bundled library included.
    bundle = sorted(hf_files.bundle_sources())
    assert bundle and all(name.startswith("performer_") and name.endswith(".py") for name in bundle)
    assert files == sorted(
        [
            "README.md",
            "config.json",
            "configuration_performer.py",
            "generation_config.json",
            "model.safetensors",
            "modeling_performer.py",
            "tokenization_performer.py",
            "tokenizer.json",
            "tokenizer/tokenizer.json",
            "tokenizer/tokenizer.model",
            "tokenizer_config.json",
            *bundle,
        ]
    )
    for path in out.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:4]
            assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{path} looks like a pickle / torch.save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "tok"]  # no temp dir left
    card = (out / "README.md").read_text()
    assert "| steps | 300 |" in card and "| eval loss | 2.5 |" in card and "| data | stdlib |" in card
    assert json.loads((out / CONFIG_FILE).read_text())["tokenizer"] == "tokenizer"


def test_reexport_replaces_an_export_but_never_another_directory(tmp_path):
    _, out = _export(tmp_path)
    model, out = _export(tmp_path, "lm")  # same directory: replaced atomically
    assert type(performer.from_pretrained(out)) is type(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not an export"):
        performer.save_pretrained(model, precious, model_kind="lm")
    assert (precious / "todo.txt").read_text() == "keep me"


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    import performer.pretrained as export

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "render_card", crash)
    with pytest.raises(OSError, match="disk full"):
        _export(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ errors


def test_wrong_arguments_are_clear_errors(tmp_path):
    model = build_model("lm", _config())
    with pytest.raises(ExportError, match="model_kind='seq2seq' but the model is a PerformerLM; .*'lm'"):
        performer.save_pretrained(model, tmp_path / "e", model_kind="seq2seq")
    with pytest.raises(ExportError, match="unknown model_kind 'gpt'"):
        performer.save_pretrained(model, tmp_path / "e", model_kind="gpt")
    with pytest.raises(ExportError, match="dtype torch.int8 is not supported"):
        performer.save_pretrained(model, tmp_path / "e", model_kind="lm", dtype=torch.int8)
    with pytest.raises(ExportError, match="tokenizer directory .* does not exist"):
        performer.save_pretrained(model, tmp_path / "e", model_kind="lm", tokenizer_dir=tmp_path / "nope")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "damage, error, message",
    [
        ("no_dir", FileNotFoundError, "no export at"),
        ("no_config", FileNotFoundError, "has no config.json"),
        ("no_weights", FileNotFoundError, "model.safetensors is missing"),
        ("bad_json", ExportError, "not valid JSON"),
        ("future_version", ExportError, "format_version 99 is not supported"),
        ("flipped_byte", ExportError, "does not match the sha256"),
        ("truncated_unchecked", ExportError, "not a readable safetensors file"),
        ("other_model", ExportError, "missing keys \\[.*\\], unexpected keys \\[none\\]"),
        ("bad_model_key", ExportError, "unknown config key .model.d_modle.; did you mean .model.d_model."),
    ],
)
def test_damaged_exports_are_clear_errors(tmp_path, damage, error, message):
    _, out = _export(tmp_path, "seq2seq")
    config_path, weights = out / CONFIG_FILE, out / WEIGHTS_FILE
    config = json.loads(config_path.read_text())
    if damage == "no_dir":
        out = tmp_path / "missing"
    elif damage == "no_config":
        config_path.unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "bad_json":
        config_path.write_text(config_path.read_text()[:40])
    elif damage == "future_version":
        config_path.write_text(json.dumps({**config, "format_version": 99}))
    elif damage == "flipped_byte":
        data = bytearray(weights.read_bytes())
        data[-3] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncated_unchecked":
        weights.write_bytes(weights.read_bytes()[:100])
        config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "weights_sha256"}))
    elif damage == "other_model":  # a config that describes a deeper model than the weights
        config["model"]["num_decoder_layers"] = 3
        config_path.write_text(json.dumps(config))
    elif damage == "bad_model_key":
        config["model"]["d_modle"] = 3
        config_path.write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        performer.from_pretrained(out)


# ------------------------------------------------------------------------------ fine-tuning example


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_example_trains_an_export_and_the_loss_falls(tmp_path, capsys):
    model, out = _export(tmp_path, "seq2seq")
    example = _load_example("finetune_seq2seq")
    code = example.main(
        [
            "--model",
            str(out),
            "--steps",
            "60",
            "--batch-size",
            "8",
            "--length",
            "6",
            "--num-symbols",
            "8",
            "--lr",
            "3e-3",
            "--log-every",
            "20",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", printed).groups())
    assert last < 0.8 * first, printed


def test_loading_an_export_imports_neither_deepspeed_nor_the_trainer(tmp_path):
    # Fine-tuners load exports with plain PyTorch: a fresh interpreter shows what loading pulls in.
    _, out = _export(tmp_path)
    script = (
        "import sys, performer\n"
        f"performer.from_pretrained({str(out)!r})\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'deepspeed', 'yaml', 'data', 'launcher'}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
