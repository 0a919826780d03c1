"""Choosing the next token: greedy, sampling (temperature, top-k, top-p) and beam search.

Axis legend: B batch, K beams, V vocabulary, T tokens so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    "Logits are divided by it (> 0); lower is greedier."
    top_k: int | None = None
    "Keep only the k most likely tokens."
    top_p: float | None = None
    "Keep the smallest set of tokens whose probability reaches p (nucleus sampling)."

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; for greedy decoding pass sampling=None")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """(B, V) -> (B, V) scaled by temperature, with tokens outside top-k / top-p set to -inf."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth_best = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the best one always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor, sampling: SamplingParams | None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) -> (B,): argmax when ``sampling`` is None, else a draw from the filtered distribution."""
    if sampling is None:
        return logits.argmax(dim=-1)
    probabilities = filter_logits(logits.float(), sampling).softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def beam_search(
    step: Callable[[torch.Tensor, object], torch.Tensor],
    cache,
    start: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    length_penalty: float = 1.0,
) -> torch.Tensor:
    """Beam search over a cached decoder.

    step(tokens (B*K, t), cache) -> next-token logits (B*K, V), consuming ``tokens`` into the
    cache, whose rows are already laid out as K beams per batch row. start: (B, 1) start tokens.
    A beam ends at EOS and then only extends with free padding. Beams are ranked by
    log-probability / length ** length_penalty. Returns the best beam per row, (B, T), without
    the start token.
    """
    batch = start.shape[0]
    device = start.device
    tokens = start.repeat_interleave(num_beams, dim=0)  # (B*K, 1)
    scores = torch.full((batch, num_beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all beams start identical: keep one alive so the first step does not pick duplicates
    finished = torch.zeros(batch * num_beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * num_beams, dtype=torch.long, device=device)
    row_offsets = torch.arange(batch, device=device)[:, None] * num_beams  # (B, 1)
    logits = step(tokens, cache)
    for _ in range(max_new_tokens):
        log_probs = logits.float().log_softmax(dim=-1)  # (B*K, V)
        vocab = log_probs.shape[-1]
        if finished.any():
            log_probs[finished] = float("-inf")
            log_probs[finished, pad_id] = 0.0
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, num_beams * vocab)
        scores, flat_choice = candidates.topk(num_beams, dim=-1)  # (B, K)
        source_beam = (row_offsets + flat_choice // vocab).reshape(-1)  # (B*K,)
        new_tokens = (flat_choice % vocab).reshape(-1, 1)
        tokens = torch.cat([tokens.index_select(0, source_beam), new_tokens], dim=1)
        finished = finished.index_select(0, source_beam)
        lengths = lengths.index_select(0, source_beam) + (~finished).long()
        if eos_id is not None:
            finished = finished | (new_tokens.squeeze(1) == eos_id)
        cache.reorder_(source_beam)
        if bool(finished.all()):
            break
        logits = step(new_tokens, cache)
    normalised = scores / lengths.reshape(batch, num_beams).clamp_min(1).float() ** length_penalty
    best = row_offsets.squeeze(1) + normalised.argmax(dim=-1)
    return tokens.index_select(0, best)[:, 1:]
