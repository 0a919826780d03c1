"""Exports in Hugging Face transformers, tokenizers and PEFT: loading, one implementation, generation,
fine-tuning, errors. Tiny random models and a SentencePiece tokenizer trained here on a few KB."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import random
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("peft", reason="the hf extra is not installed")

import performer  # noqa: E402
import performer.hf  # noqa: E402
from data.tokenizer import SCORE_STEP, SpecialTokens, Tokenizer, TokenizerConfig, train_tokenizer  # noqa: E402
from launcher.__main__ import main as performer_main  # noqa: E402
from launcher.commands.generate import encode_prompt  # noqa: E402
from performer import hf_files  # noqa: E402
from performer.config import preset  # noqa: E402
from performer.hf import PerformerCache, PerformerConfig  # noqa: E402
from performer.models import build_model  # noqa: E402
from performer.pretrained import ExportError  # noqa: E402

AutoConfig, AutoTokenizer = transformers.AutoConfig, transformers.AutoTokenizer
AUTO = {"seq2seq": transformers.AutoModelForSeq2SeqLM, "lm": transformers.AutoModelForCausalLM}
transformers.logging.disable_progress_bar()

# Tiny models gain nothing from threads, and on a busy 2-core machine two threads crawl.
pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 420
SPECIAL = SpecialTokens(VOCAB, num_sentinels=20)
# A few KB of code, prose, indentation, tabs and non-ASCII text; every printable ASCII character
# is in it, as in any real corpus (a literal "<0x0A>" then spells out as in SentencePiece).
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int = 0\n    y: int = 0\n\n    def norm(self):\n",
    "        return (self.x**2 + self.y**2) ** 0.5\n",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~\n",
    "for i in range(10):\n\tif i % 2:\n\t\tprint(i, end='')\n",
    "the quick brown fox jumps over the lazy dog; THE QUICK BROWN FOX!\n",
    "Grüße aus Köln: café, naïve, façade — déjà vu. Ελληνικά και русский текст.\n",
    "# comment with numbers 12345 and symbols {}[]()<>=+-*/%&|^~@#$\n",
] * 12
VARIED_TEXTS = [
    "",
    " ",
    "x",
    "def add(a, b):",
    "    return a + b",
    "  leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "tabs\tbetween\t\twords\t",
    "\tindented with a tab",
    "lines\nand\n\nblank lines\r\nand CRLF\n",
    "mixed \t \n whitespace \n\t\n",
    "Grüße, café, naïve — déjà vu",
    "日本語のテキスト and 中文 and 한국어",
    "emoji 🎉🚀 and symbols ∑∫√ ≠ ≤",
    "Ελληνικά και русский",
    "literal specials </s> <s> <pad> <mask> <unk> <0x0A> stay text",
    "the ▁ character itself ▁▁",
    "1234567890 3.14159 -42",
    "x" * 200,
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(CORPUS, TokenizerConfig(vocab_size=VOCAB, num_sentinels=20, sample_lines=1000, num_threads=1), out)
    return out


def _export(root: Path, kind: str, tokenizer_dir: Path | None, attention_type: str = "favor", **overrides) -> Path:
    # As a training run builds it: targets start from the tokenizer's bos.
    values = dict(
        vocab_size=VOCAB,
        d_model=32,
        num_heads=4,
        dropout=0.0,
        attention_type=attention_type,
        decoder_start_id=SPECIAL.bos_id,
    )
    config = preset("tiny", **{**values, **overrides})
    torch.manual_seed({"seq2seq": 1, "lm": 2}[kind])
    model = build_model(kind, config)
    return performer.save_pretrained(
        model, root / f"{kind}-{attention_type}", model_kind=kind, tokenizer_dir=tokenizer_dir
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("exports")
    return {
        "seq2seq": _export(root, "seq2seq", tokenizer_dir),
        "lm": _export(root, "lm", tokenizer_dir),
        "lm-softmax": _export(root, "lm", tokenizer_dir, "softmax"),
    }


def _batch(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, VOCAB - 20, (2, 11), generator=generator)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(5, VOCAB - 20, (2, 6), generator=generator)
    return batch


def _kind(name: str) -> str:
    return name.split("-")[0]


# ------------------------------------------------------------------------------ tokenizer


@pytest.mark.parametrize("kind", ["seq2seq", "lm"])
def test_fast_tokenizer_gives_our_ids_on_varied_text(exports, tokenizer_dir, kind):
    ours = Tokenizer.load(tokenizer_dir)
    fast = AutoTokenizer.from_pretrained(exports[kind])
    assert type(fast).__name__ == "PerformerTokenizerFast" and fast.is_fast
    assert len(fast) == VOCAB and fast.pad_token_id == SPECIAL.pad_id and fast.eos_token_id == SPECIAL.eos_id
    assert (fast.bos_token_id, fast.unk_token_id, fast.mask_token_id) == (SPECIAL.bos_id, SPECIAL.unk_id, 4)
    for text in VARIED_TEXTS:
        ids = ours.encode(text)
        assert fast(text, add_special_tokens=False)["input_ids"] == ids, repr(text)
        framed = ids + [SPECIAL.eos_id] if kind == "seq2seq" else [SPECIAL.eos_id] + ids
        assert fast(text)["input_ids"] == framed, repr(text)  # as pretraining framed a text
        assert fast.decode(ids) == ours.decode(ids), repr(text)
    batch = fast(VARIED_TEXTS[1:5], padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}  # no token_type_ids for the model to refuse


def test_sentinels_are_single_tokens_as_performer_generate_reads_them(exports, tokenizer_dir):
    ours = Tokenizer.load(tokenizer_dir)
    fast = AutoTokenizer.from_pretrained(exports["seq2seq"])
    assert fast.convert_tokens_to_ids("<extra_id_0>") == SPECIAL.sentinel_id(0) == VOCAB - 1
    assert fast.convert_tokens_to_ids("<extra_id_19>") == SPECIAL.sentinel_id(19)
    prompts = [
        "def read(path):\n    with open(<extra_id_0>) as handle:\n        return <extra_id_1>(handle)",
        "<extra_id_0> starts the text",
        "ends with a sentinel <extra_id_3>",
        "no space<extra_id_2>between  <extra_id_4>\tand tabs",
        "<extra_id_0><extra_id_1>",
    ]
    for prompt in prompts:
        ids = encode_prompt(ours, prompt)
        assert fast(prompt, add_special_tokens=False)["input_ids"] == ids, prompt
        assert fast.decode(ids) == ours.decode(ids) == prompt
        assert fast.decode(ids + [SPECIAL.eos_id], skip_special_tokens=True) == prompt  # sentinels are kept


def test_fast_tokenizer_gives_sentencepiece_ids_on_slices_and_whole_modules(exports, tokenizer_dir):
    # SentencePiece adds scores in float32, tokenizers in float64: with scores rounded to 1/16 and
    # long texts encoded in runs of lines both add exactly and break ties alike. This tiny tokenizer,
    # with more whitespace pieces than words, ties often (its unrounded scores differ on ~1 slice in 10).
    ours = Tokenizer.load(tokenizer_dir)
    assert ours.exact_chars is not None
    fast = AutoTokenizer.from_pretrained(exports["seq2seq"])
    rng = random.Random(0)
    modules = [Path(module.__file__).read_text(encoding="utf-8") for module in (inspect, random, json.decoder)]
    assert max(map(len, modules)) > ours.exact_chars  # inspect.py: encoded in runs of lines
    samples = list(CORPUS[:7]) + modules
    for _ in range(300):
        source = modules[rng.randrange(len(modules))]
        start = rng.randrange(len(source))
        samples.append(source[start : start + rng.randrange(1, 300)])
    for text, ids in zip(samples, fast(samples, add_special_tokens=False)["input_ids"]):
        assert ids == ours.encode(text), repr(text[:200])


def test_a_tokenizer_with_unrounded_scores_converts_with_a_warning(tmp_path, tokenizer_dir):
    from sentencepiece import sentencepiece_model_pb2

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    proto = sentencepiece_model_pb2.ModelProto.FromString((tokenizer_dir / "tokenizer.model").read_bytes())
    for piece in proto.pieces:
        piece.score -= 0.01 if piece.type == 1 else 0.0  # as trained before rounding: arbitrary float32 scores
    (legacy / "tokenizer.model").write_bytes(proto.SerializeToString())
    (legacy / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.load(legacy).exact_chars is None  # encodes whole texts, as it always did
    assert hf_files._EXACT_SCORE_STEP == SCORE_STEP  # the export's check is the trainer's rounding
    with pytest.warns(UserWarning, match="trained before scores were rounded.*performer data tokenizer"):
        hf_files.fast_tokenizer(legacy, SPECIAL.to_dict(), "seq2seq")


# ------------------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", ["seq2seq", "lm", "lm-softmax"])
def test_auto_classes_open_the_export_with_performers_weights_and_logits(exports, name):
    kind, export = _kind(name), exports[name]
    config = AutoConfig.from_pretrained(export)
    assert isinstance(config, PerformerConfig) and config.model_kind == kind
    assert config.is_encoder_decoder == (kind == "seq2seq")
    model = AUTO[kind].from_pretrained(export)
    reference = performer.from_pretrained(export)
    assert type(model).__name__ == {"seq2seq": "PerformerForConditionalGeneration", "lm": "PerformerForCausalLM"}[kind]
    assert not model.training and model.can_generate()
    ours, theirs = reference.state_dict(), model.state_dict()
    assert list(theirs) == list(ours)  # the export's names, key for key
    assert all(torch.equal(theirs[key], ours[key]) for key in ours)
    with torch.no_grad():
        expected = reference(**_batch(kind)).logits
        exact = model(**_batch(kind), use_cache=False).logits
        cached = model(**_batch(kind) if kind == "seq2seq" else {"input_ids": _batch(kind)["input_ids"]}).logits
        unpadded = reference(**({"input_ids": _batch(kind)["input_ids"]} if kind == "lm" else _batch(kind))).logits
    assert torch.equal(exact, expected)  # the same modules in the same order
    # use_cache (the default) runs the decoder on its recurrent decoding state instead.
    assert (cached - unpadded).abs().max().item() < 1e-5


def test_projections_stay_fixed_as_exported(exports):
    export = exports["seq2seq"]
    model = AUTO["seq2seq"].from_pretrained(export)
    exported = [attention.projection.clone() for attention in performer.from_pretrained(export).favor_attentions()]
    assert all(bool(attention.projection_fixed) for attention in model.favor_attentions())
    assert all(torch.equal(a.projection, b) for a, b in zip(model.favor_attentions(), exported))
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        model(**_batch("seq2seq"), labels=_batch("seq2seq")["decoder_input_ids"]).loss.backward()
        optimizer.step()
    model.redraw_projection_matrices_(seed=5, step=9)
    assert all(torch.equal(a.projection, b) for a, b in zip(model.favor_attentions(), exported))


# ------------------------------------------------------------------------------ generation


def _performer_ids(export: Path, kind: str, tokenizer: Tokenizer, prompt: str, new_tokens: int) -> list[int]:
    """What `performer generate` decodes greedily (its input layout, launcher/commands/generate.py)."""
    model, eos = performer.from_pretrained(export), SPECIAL.eos_id
    if kind == "seq2seq":
        ids = model.generate(
            torch.tensor([encode_prompt(tokenizer, prompt) + [eos]]), max_new_tokens=new_tokens, eos_id=eos
        )
        return ids[0].tolist()
    context = torch.tensor([[eos] + encode_prompt(tokenizer, prompt)])
    return model.generate(context, max_new_tokens=new_tokens, eos_id=eos)[0, context.shape[1] :].tolist()


def _until_eos(ids: list[int]) -> list[int]:
    return ids[: ids.index(SPECIAL.eos_id)] if SPECIAL.eos_id in ids else ids


@pytest.mark.parametrize("name", ["seq2seq", "lm", "lm-softmax"])
def test_greedy_generate_equals_performer_generate_token_for_token(exports, tokenizer_dir, capsys, name):
    kind, export, new_tokens = _kind(name), exports[name], 12
    prompt = "def add(a, b):<extra_id_0>" if kind == "seq2seq" else "def add(a, b):\n    return"
    fast = AutoTokenizer.from_pretrained(export)
    model = AUTO[kind].from_pretrained(export)
    inputs = fast(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, num_beams=1)[0].tolist()
    generated = output[1:] if kind == "seq2seq" else output[inputs["input_ids"].shape[1] :]  # after start / prompt
    expected = _performer_ids(export, kind, Tokenizer.load(tokenizer_dir), prompt, new_tokens)
    assert generated[: len(expected)] == expected and len(expected) > 0
    # And the command's text is the text of those tokens.
    assert performer_main(["generate", "--model", str(export), "--prompt", prompt, "--max-new-tokens", "12"]) == 0
    text = Tokenizer.load(tokenizer_dir).decode(_until_eos(expected))
    assert capsys.readouterr().out == (text if kind == "seq2seq" else prompt + text) + "\n"


@pytest.mark.parametrize("name", ["seq2seq", "lm", "lm-softmax"])
def test_beam_search_and_sampling_on_the_recurrent_cache_match_full_recomputation(exports, name):
    kind, export = _kind(name), exports[name]
    model = AUTO[kind].from_pretrained(export)
    # Seq2seq: a padded batch of sources; LM: one prompt (cached LM decoding takes no padding).
    prompts = ["def add(a, b):", "class Point:"] if kind == "seq2seq" else ["def add(a, b):"]
    inputs = AutoTokenizer.from_pretrained(export)(prompts, padding=True, return_tensors="pt")
    settings = [
        dict(num_beams=3, num_return_sequences=2, do_sample=False),  # the cache is reordered at every step
        dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, num_return_sequences=2),
    ]
    for setting in settings:
        torch.manual_seed(0)
        cached = model.generate(**inputs, max_new_tokens=8, **setting)
        torch.manual_seed(0)
        recomputed = model.generate(**inputs, max_new_tokens=8, use_cache=False, **setting)
        assert torch.equal(cached, recomputed), setting
    first = {key: value[:1] for key, value in inputs.items()}
    if kind == "seq2seq":
        first["decoder_input_ids"] = torch.tensor([[SPECIAL.bos_id]])
    with torch.no_grad():
        output = model(**first)
    cache = output["cache"] if "cache" in output else output["past_key_values"]  # transformers renamed it
    assert isinstance(cache, PerformerCache)
    assert cache.get_seq_length() == (1 if kind == "seq2seq" else first["input_ids"].shape[1])


def test_padded_prompts_are_refused_for_cached_lm_generation(exports):
    model = AUTO["lm"].from_pretrained(exports["lm"])
    ids = torch.tensor([[5, 6, 7], [0, 8, 9]])
    with pytest.raises(ValueError, match="attention_mask has padding.*prompts of equal length"):
        model.generate(ids, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), max_new_tokens=2)


# ------------------------------------------------------------------------------ training features


def test_gradient_checkpointing_resize_bf16_and_save_pretrained_round_trip(exports, tmp_path):
    export = exports["seq2seq"]
    model = AUTO["seq2seq"].from_pretrained(export)
    batch, labels = _batch("seq2seq"), _batch("seq2seq")["decoder_input_ids"]
    model.train()
    model(**batch, labels=labels).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    model(**batch, labels=labels).loss.backward()
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), plain))
    model.gradient_checkpointing_disable()
    model.eval()

    model.resize_token_embeddings(VOCAB + 8)
    assert model.config.vocab_size == VOCAB + 8 and model(**batch).logits.shape[-1] == VOCAB + 8
    model.save_pretrained(tmp_path / "resized")
    with torch.no_grad():
        expected = model(**batch, use_cache=False).logits
        again = AUTO["seq2seq"].from_pretrained(tmp_path / "resized")(**batch, use_cache=False).logits
        # A transformers save is an export again: the performer library opens it too.
        ours = performer.from_pretrained(tmp_path / "resized")(**batch).logits
    assert torch.equal(again, expected) and torch.equal(ours, expected)

    bf16 = AUTO["seq2seq"].from_pretrained(export, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.embedding.tokens.weight.dtype == torch.bfloat16
    exported = performer.from_pretrained(export).favor_attentions()
    assert all(a.projection.dtype == torch.float32 for a in bf16.favor_attentions())
    assert all(torch.equal(a.projection, b.projection) for a, b in zip(bf16.favor_attentions(), exported))
    with torch.no_grad():
        reference = performer.from_pretrained(export)(**batch).logits
        logits = bf16(**batch, use_cache=False).logits.float()
    assert (logits - reference).abs().max() < 0.1 * reference.abs().max()
    assert bf16.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4).shape[0] == 2


def test_a_model_built_from_a_config_alone_saves_as_an_export(tmp_path):
    config = PerformerConfig(model_kind="lm", model={"vocab_size": 300, "d_model": 32, "num_heads": 4})
    model = performer.hf.PerformerForCausalLM(config).eval()
    assert all(bool(attention.projection_fixed) for attention in model.favor_attentions())
    model.save_pretrained(tmp_path / "scratch")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        assert torch.equal(performer.from_pretrained(tmp_path / "scratch")(input_ids=ids).logits, expected)
        reloaded = AUTO["lm"].from_pretrained(tmp_path / "scratch")
        assert torch.equal(reloaded(input_ids=ids, use_cache=False).logits, expected)


# ------------------------------------------------------------------------------ fine-tuning


def _finetune_example():
    spec = importlib.util.spec_from_file_location("finetune_hf", REPO_ROOT / "examples" / "finetune_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finetune_args(export: Path, out: Path, method: str, steps: int, lr: float) -> Namespace:
    return Namespace(
        model=str(export),
        out=str(out),
        method=method,
        steps=steps,
        batch_size=16,
        lr=lr,
        lora_rank=8,
        train_examples=400,
        eval_examples=64,
        seed=0,
        cpu=True,
    )


def test_seq2seq_trainer_fine_tunes_an_export_and_the_held_out_metric_improves(exports, tmp_path, capsys):
    results = _finetune_example().run(_finetune_args(exports["seq2seq"], tmp_path, "full", steps=60, lr=3e-3))
    (loss_before, loss_after), (accuracy_before, accuracy_after) = results["eval_loss"], results["token_accuracy"]
    assert results["train_loss"][1] < 0.5 * results["train_loss"][0]
    assert loss_after < 0.5 * loss_before and accuracy_after > accuracy_before + 0.2, results
    assert results["reload_max_logit_difference"] == 0.0
    # The fine-tuned directory is an export: performer generate reads it, tokenizer and all, and
    # decodes as transformers' generate() does, now on a model whose greedy output varies.
    saved = Path(results["saved"])
    model, tokenizer = AUTO["seq2seq"].from_pretrained(saved), Tokenizer.load(saved / "tokenizer")
    capsys.readouterr()  # the trainer's logs
    seen = set()
    for prompt in ["red cat dog", "sun moon tree stone", "blue fox"]:
        inputs = AutoTokenizer.from_pretrained(saved)(prompt, return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, 1:].tolist()
        expected = _performer_ids(saved, "seq2seq", tokenizer, prompt, 10)
        assert generated == expected, (generated, expected)
        seen.update(expected)
        assert performer_main(["generate", "--model", str(saved), "--prompt", prompt, "--max-new-tokens", "10"]) == 0
        assert capsys.readouterr().out == tokenizer.decode(_until_eos(expected)) + "\n"
    assert len(seen) > 4  # not one token repeated


def test_peft_lora_trains_only_the_adapters_and_the_merged_model_reloads(exports, tmp_path):
    results = _finetune_example().run(_finetune_args(exports["seq2seq"], tmp_path, "lora", steps=60, lr=1e-2))
    assert results["base_weights_changed"] == 0 and results["adapter_parameters"] > 0
    assert results["eval_loss"][1] < results["eval_loss"][0] and results["train_loss"][1] < results["train_loss"][0]
    assert results["token_accuracy"][1] > results["token_accuracy"][0]
    assert results["reload_max_logit_difference"] == 0.0
    merged = performer.from_pretrained(results["saved"])
    assert not any("lora" in name for name in merged.state_dict())


# ------------------------------------------------------------------------------ remote code and registration


def _python(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HOME": str(tmp_path / "hf-home"), **env}
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        stdin=subprocess.DEVNULL,
        timeout=180,
    )


@pytest.mark.parametrize("library", ["installed", "not installed"])
def test_remote_code_opens_the_export_without_importing_performer(exports, tmp_path, library):
    # Where performer is installed the remote code takes its classes from it; elsewhere from the
    # copy of the library's model modules that the export carries.
    export = exports["seq2seq"]
    with torch.no_grad():
        expected = performer.from_pretrained(export)(**_batch("seq2seq")).logits
    batch = {key: value.tolist() for key, value in _batch("seq2seq").items()}
    hide = 'sys.modules["performer"] = None  # as if it were not installed' if library == "not installed" else ""
    script = f"""
import json, sys, torch
{hide}
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
try:
    AutoModelForSeq2SeqLM.from_pretrained({str(export)!r})
    print("opened without trust_remote_code")
except ValueError as error:
    assert "trust_remote_code" in str(error), error
assert "performer" not in sys.modules or sys.modules["performer"] is None
model = AutoModelForSeq2SeqLM.from_pretrained({str(export)!r}, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained({str(export)!r}, trust_remote_code=True)
batch = {{key: torch.tensor(value) for key, value in json.loads({json.dumps(batch)!r}).items()}}
with torch.no_grad():
    logits = model(**batch, use_cache=False).logits
inputs = tokenizer("def add(a, b):<extra_id_0>", return_tensors="pt")
beams = model.generate(**inputs, max_new_tokens=6, num_beams=2)
model.save_pretrained({str(tmp_path / "saved")!r})
tokenizer.save_pretrained({str(tmp_path / "saved")!r})
print(json.dumps({{
    "modules": [type(model).__module__, type(tokenizer).__module__],
    "logits": logits.tolist(),
    "ids": inputs["input_ids"][0].tolist(),
    "beams": beams[0].tolist(),
}}))
"""
    result = _python(script, tmp_path)
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout[result.stdout.index("{") :])  # after transformers' trust prompt
    if library == "installed":
        assert output["modules"] == ["performer.hf.modeling", "performer.hf.tokenization"]
    else:
        assert all(name.startswith("transformers_modules.") for name in output["modules"]), output["modules"]
    assert torch.equal(torch.tensor(output["logits"]), expected)
    model = AUTO["seq2seq"].from_pretrained(export)
    assert output["ids"] == AutoTokenizer.from_pretrained(export)("def add(a, b):<extra_id_0>")["input_ids"]
    assert output["beams"] == model.generate(torch.tensor([output["ids"]]), max_new_tokens=6, num_beams=2)[0].tolist()
    # What it saved is an export again, remote code and bundle included.
    saved = tmp_path / "saved"
    assert sorted(path.name for path in saved.glob("performer_*.py")) == sorted(hf_files.bundle_sources())
    with torch.no_grad():
        assert torch.equal(performer.from_pretrained(saved)(**_batch("seq2seq")).logits, expected)


@pytest.mark.parametrize("order", ["performer first", "transformers first"])
def test_import_performer_registers_the_auto_classes_and_never_imports_transformers(exports, tmp_path, order):
    if order == "performer first":
        imports = """
import importlib.util
import performer, launcher.pretrain
hf = ("transformers", "tokenizers", "peft", "accelerate")
assert not any(name.split(".")[0] in hf for name in sys.modules)  # neither the library nor the trainer
assert importlib.util.find_spec("transformers") is not None  # a lookup (availability checks) is no import
assert not any(name.split(".")[0] in hf for name in sys.modules)
import transformers
"""
    else:
        imports = "import transformers\nimport performer"
    script = f"""
import sys
{imports}
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
print(type(AutoModelForSeq2SeqLM.from_pretrained({str(exports["seq2seq"])!r})).__name__)
print(type(AutoModelForCausalLM.from_pretrained({str(exports["lm"])!r})).__name__)
print(type(AutoTokenizer.from_pretrained({str(exports["lm"])!r})).__name__)
"""
    result = _python(script, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "PerformerForConditionalGeneration",
        "PerformerForCausalLM",
        "PerformerTokenizerFast",
    ]


# ------------------------------------------------------------------------------ errors


def test_errors_name_the_file_and_the_fix(exports, tokenizer_dir, tmp_path):
    import shutil

    export = Path(shutil.copytree(exports["seq2seq"], tmp_path / "export"))
    config_path = export / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ExportError, match=f"{config_path}: format_version 99 is not supported.*export again"):
        AUTO["seq2seq"].from_pretrained(export)
    config_path.write_text(json.dumps({**config, "model": {**config["model"], "d_modle": 32}}))
    with pytest.raises(ExportError, match=f"{config_path}: .*unknown config key 'model.d_modle'; did you mean"):
        AutoConfig.from_pretrained(export)
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="is a seq2seq export and PerformerForCausalLM reads lm exports: .*AutoModelFor"
    ):
        AUTO["lm"].from_pretrained(export)

    (export / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{export / 'tokenizer.json'} is missing.*export again"):
        AutoTokenizer.from_pretrained(export)

    # At export time: a tokenizer that is not one, or not the model's.
    broken = Path(shutil.copytree(tokenizer_dir, tmp_path / "broken"))
    (broken / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ExportError, match=f"{broken / 'tokenizer.model'} is not a SentencePiece model"):
        _export(tmp_path / "e1", "seq2seq", broken)
    with pytest.raises(ExportError, match="has 420 ids but the model 600; pass the tokenizer the model was trained"):
        _export(tmp_path / "e2", "lm", tokenizer_dir, vocab_size=600)
    assert not (tmp_path / "e1").exists() and not (tmp_path / "e2").exists()


def test_code_planted_in_an_export_never_runs_without_trust_remote_code(exports, tmp_path):
    # An export's Python files run only when transformers is told to trust them: performer's own
    # loaders and the Auto classes performer registered never import them.
    import shutil

    export = Path(shutil.copytree(exports["seq2seq"], tmp_path / "export"))
    proof = tmp_path / "payload-ran"
    payload = f"from pathlib import Path\nPath({str(proof)!r}).write_text('ran')\n"
    for path in export.glob("*.py"):
        path.write_text(payload + path.read_text())
    performer.from_pretrained(export)
    assert performer_main(["generate", "--model", str(export), "--prompt", "x", "--max-new-tokens", "2"]) == 0
    AUTO["seq2seq"].from_pretrained(export)
    AUTO["seq2seq"].from_pretrained(export, trust_remote_code=True)  # performer's registered classes win
    AutoTokenizer.from_pretrained(export)
    assert not proof.exists()
