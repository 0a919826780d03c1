"""`performer generate`: sample text from an export with its own tokenizer.

    performer generate --model EXPORT_DIR --prompt TEXT [--max-new-tokens 64] [--num-beams K]
                       [--temperature T] [--top-k K] [--top-p P] [--seed S]

seq2seq exports read the prompt the way pretraining fed the encoder: the prompt's tokens then eos
(span-corruption inputs end with eos, data/objectives.py), and the decoder starts from the
export's `decoder_start_id` (bos, the start of the stream's target rows, data/stream.py);
`<extra_id_N>` in the prompt is
sentinel N, so `def f(x):<extra_id_0> x` asks the model to fill the span. The output is the
decoder's text up to eos (sentinels shown as `<extra_id_N>`).
LM exports continue the prompt, which follows an eos (in the packed training stream every
document but the first of a row follows one), and print prompt + continuation.
Greedy decoding unless a sampling option is given; `--num-beams` (seq2seq only) for beam search.
Text goes to stdout; errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from data.tokenizer import Tokenizer
from performer.errors import InputError
from performer.generation import SamplingParams
from performer.models import PerformerLM, PerformerSeq2Seq
from performer.pretrained import TOKENIZER_DIR, from_pretrained

_SENTINEL = re.compile(r"<extra_id_(\d+)>")


class GenerateError(InputError):
    """A problem with the user's request or export: printed as one line, exit code 2."""


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from an exported model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="export directory (performer export / save_pretrained)")
    parser.add_argument("--prompt", required=True, help="input text (seq2seq) or text to continue (LM)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search width (seq2seq; 1 = no beam search)")
    sampling = parser.add_argument_group("sampling (any of these turns greedy decoding into sampling)")
    sampling.add_argument("--temperature", type=float, help="divide the logits by T (> 0; lower is greedier)")
    sampling.add_argument("--top-k", type=int, help="sample among the K most likely tokens")
    sampling.add_argument("--top-p", type=float, help="sample among the most likely tokens that reach probability P")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, cuda:1, ...)")
    parser.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    print(generate_text(args))
    return 0


def generate_text(args: argparse.Namespace) -> str:
    sampling = _sampling_params(args)
    model, tokenizer = _load(Path(args.model), args.device)
    prompt = encode_prompt(tokenizer, args.prompt)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    special = tokenizer.special
    if isinstance(model, PerformerSeq2Seq):
        source = torch.tensor([prompt + [special.eos_id]], device=args.device)
        output = model.generate(
            source,
            max_new_tokens=args.max_new_tokens,
            eos_id=special.eos_id,
            num_beams=args.num_beams,
            sampling=sampling,
            generator=generator,
        )[0]
        return tokenizer.decode(_until_eos(output.tolist(), special.eos_id))
    if isinstance(model, PerformerLM):
        if args.num_beams > 1:
            raise GenerateError("--num-beams works with seq2seq exports only; sample or decode greedily with an LM")
        context = torch.tensor([[special.eos_id] + prompt], device=args.device)
        output = model.generate(
            context, max_new_tokens=args.max_new_tokens, eos_id=special.eos_id, sampling=sampling, generator=generator
        )[0]
        return tokenizer.decode(_until_eos(output[1:].tolist(), special.eos_id))
    raise GenerateError(
        f"{args.model} is a {type(model).__name__}: an encoder-only model does not generate text; "
        "use a seq2seq or LM export"
    )


def _sampling_params(args: argparse.Namespace) -> SamplingParams | None:
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise GenerateError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.temperature is None and args.top_k is None and args.top_p is None:
        return None
    if args.num_beams > 1:
        raise GenerateError("beam search is deterministic: drop --num-beams or the sampling options")
    try:
        return SamplingParams(
            temperature=1.0 if args.temperature is None else args.temperature, top_k=args.top_k, top_p=args.top_p
        )
    except ValueError as error:
        raise GenerateError(str(error)) from None


def _load(export_dir: Path, device: str):
    tokenizer_dir = export_dir / TOKENIZER_DIR
    try:
        model = from_pretrained(export_dir, device=device)
    except FileNotFoundError as error:  # from_pretrained's word for a missing export or file (ExportError: the rest)
        raise GenerateError(str(error)) from None
    if not tokenizer_dir.is_dir():
        raise GenerateError(
            f"{export_dir} has no {TOKENIZER_DIR}/ directory; export again with the "
            "tokenizer (performer export, or save_pretrained(..., tokenizer_dir=DIR))"
        )
    tokenizer = Tokenizer.load(tokenizer_dir)  # a damaged one is a DataError naming the file
    if tokenizer.vocab_size != model.config.vocab_size:
        raise GenerateError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model {model.config.vocab_size}; "
            "the export's tokenizer/ is not the one the model was trained with"
        )
    return model, tokenizer


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, with each ``<extra_id_N>`` as sentinel N (SentencePiece alone would
    spell it out in ordinary pieces: the sentinels live outside its model)."""
    ids: list[int] = []
    position = 0
    for match in _SENTINEL.finditer(text):
        ids += _encode_segment(tokenizer, text[position : match.start()], at_start=not ids)
        index = int(match.group(1))
        count = tokenizer.special.num_sentinels
        if index >= count:
            raise GenerateError(
                f"<extra_id_{index}> in the prompt: this tokenizer has {count} sentinels "
                f"(<extra_id_0> .. <extra_id_{count - 1}>)"
            )
        ids.append(tokenizer.special.sentinel_id(index))
        position = match.end()
    return ids + _encode_segment(tokenizer, text[position:], at_start=not ids)


def _encode_segment(tokenizer: Tokenizer, segment: str, at_start: bool) -> list[int]:
    """Ids of a piece of the prompt. After a sentinel the text is mid-document, as in training
    (spans are cut from encoded documents): no dummy prefix (SentencePiece's space before a text)."""
    if not segment:
        return []
    return tokenizer.encode(segment) if at_start else tokenizer.encode_continuation(segment)


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids
