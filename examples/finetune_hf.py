"""Fine-tune a seq2seq Performer export with Hugging Face transformers, fully or with PEFT LoRA.

    python examples/finetune_hf.py --model runs/tiny/export --out runs/tiny/finetuned [--method lora] [--steps 300]

Needs the hf extra (pip install -e '.[hf]'). The export opens with the Auto classes (performer
registers them; ``trust_remote_code=True`` would do without the import), is trained by
``Seq2SeqTrainer`` and saved with ``save_pretrained``; the saved directory is an export again
(``performer.from_pretrained`` and ``performer generate`` open it).

The task: a few words in, the same words in reverse order out, as text through the export's own
tokenizer (which appends eos to every text, as pretraining framed its inputs and targets). The
held-out metric is token accuracy under teacher forcing, measured before and after training.
``--method lora`` trains LoRA adapters on the attention's query and value projections only; the
base weights are checked unchanged, the adapters merged into the weights, and the merged model
saved. Either way the saved model is reloaded and its logits compared with the trained model's.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

import performer  # noqa: F401  (registers the Performer classes with transformers' Auto classes)

WORDS = "red green blue cat dog fox sun moon tree stone river cloud".split()


def reverse_words_examples(tokenizer, count: int, seed: int, min_words: int = 2, max_words: int = 5) -> list[dict]:
    """``count`` examples of the task, tokenized: input_ids, attention_mask, labels."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        encoded = tokenizer(" ".join(words), text_target=" ".join(reversed(words)))
        examples.append({key: encoded[key] for key in ("input_ids", "attention_mask", "labels")})
    return examples


def token_accuracy(prediction) -> dict[str, float]:
    """Teacher-forced token accuracy over the labelled positions (compute_metrics)."""
    predicted, labels = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    keep = labels != -100
    return {"token_accuracy": float((predicted[keep] == labels[keep]).float().mean())}


def argmax_logits(logits, labels):
    """Keep only the argmax of the logits between evaluation steps (preprocess_logits_for_metrics)."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    return logits.argmax(dim=-1)


def add_lora(model, rank: int):
    """LoRA adapters on every attention's query and value projection (nn.Linear q_proj / v_proj)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        task_type=TaskType.SEQ_2_SEQ_LM,
    )
    return get_peft_model(model, config)


def run(args: argparse.Namespace) -> dict:
    """Fine-tune, save, reload; returns the measurements (also printed)."""
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model, dtype=torch.float32)  # train in fp32
    if not model.config.is_encoder_decoder:
        raise SystemExit(f"{args.model} is not a seq2seq export; this example fine-tunes seq2seq models")
    base = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    if args.method == "lora":
        model = add_lora(model, args.lora_rank)
    trainer = Seq2SeqTrainer(
        model=model,
        args=Seq2SeqTrainingArguments(
            output_dir=str(Path(args.out) / "trainer"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=64,
            learning_rate=args.lr,
            warmup_steps=min(10, args.steps // 10),
            weight_decay=0.01,
            logging_steps=max(1, args.steps // 10),
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=args.cpu,
            seed=args.seed,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available() and not args.cpu,
            disable_tqdm=True,
        ),
        train_dataset=reverse_words_examples(tokenizer, args.train_examples, seed=args.seed),
        eval_dataset=reverse_words_examples(tokenizer, args.eval_examples, seed=args.seed + 1),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        compute_metrics=token_accuracy,
        preprocess_logits_for_metrics=argmax_logits,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    results = {
        "eval_loss": (before["eval_loss"], after["eval_loss"]),
        "token_accuracy": (before["eval_token_accuracy"], after["eval_token_accuracy"]),
        "train_loss": (losses[0], losses[-1]),
    }
    if args.method == "lora":
        base_model = model.get_base_model()
        changed = [
            name
            for name, tensor in base_model.state_dict().items()
            if "lora_" not in name and not torch.equal(tensor, base[name.replace(".base_layer", "")])
        ]
        results["base_weights_changed"] = len(changed)
        results["adapter_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model = model.merge_and_unload()
    model.eval()
    out = Path(args.out) / "model"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    batch = DataCollatorForSeq2Seq(tokenizer, model=model)(reverse_words_examples(tokenizer, 8, seed=args.seed + 2))
    with torch.no_grad():
        expected = model(**batch.to(model.device), use_cache=False).logits
        got = reloaded(**batch.to(reloaded.device), use_cache=False).logits
    results["reload_max_logit_difference"] = float((expected - got).abs().max())
    results["saved"] = str(out)
    for key, value in results.items():
        if isinstance(value, tuple):
            print(f"{key}: {value[0]:.4f} -> {value[1]:.4f}")
        else:
            print(f"{key}: {value}")
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a seq2seq export (performer export / save_pretrained)")
    parser.add_argument("--out", required=True, help="where the fine-tuned model goes (OUT/model)")
    parser.add_argument("--method", choices=("full", "lora"), default="full")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=None, help="default 1e-3 (full) or 1e-2 (lora)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is available")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 1e-2 if args.method == "lora" else 1e-3
    return args


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
