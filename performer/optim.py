"""Optimizer parameter groups: which parameters get weight decay.

The convention of T5, nanoGPT, torchtitan and Megatron: weight matrices decay; normalisation
gains and biases, biases and embedding tables do not. Decay pulls a weight toward 0 whether or
not its gradient opposes it: a norm gain drifts toward 0 (shrinking its whole layer's output) and
the rows of rare tokens shrink between their few updates, neither of which any loss asked for.

Every parameter has one kind:

* ``matrices``: any other parameter with 2 or more dimensions (linear layers' weights);
* ``embeddings``: tables of ``nn.Embedding`` modules (token and learned position embeddings; a
  tied output head is the token table itself);
* ``norms``: parameters of normalisation modules (LayerNorm weight and bias, ScaleNorm gain) and
  every other parameter with fewer than 2 dimensions that is not a bias (ReZero scales);
* ``biases``: other parameters named ``bias``.

Plain torch: no DeepSpeed, usable by any training loop (``torch.optim.AdamW(groups, ...)``).
"""

from __future__ import annotations

from typing import Iterable

import torch.nn as nn

from performer.normalization import ScaleNorm

PARAMETER_KINDS = ("matrices", "embeddings", "norms", "biases")
NO_DECAY_DEFAULT = ("norms", "biases", "embeddings")
_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, ScaleNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """{parameter name: kind} for every distinct parameter (a tied one under its first name)."""
    kinds: dict[str, str] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for leaf, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            if isinstance(module, nn.Embedding):
                kind = "embeddings"
            elif isinstance(module, _NORM_MODULES):
                kind = "norms"
            elif leaf == "bias":
                kind = "biases"
            elif parameter.ndim >= 2:
                kind = "matrices"
            else:
                kind = "norms"
            kinds[f"{module_name}.{leaf}" if module_name else leaf] = kind
    return kinds


def check_no_decay(no_decay: Iterable[str]) -> tuple[str, ...]:
    no_decay = tuple(no_decay)
    unknown = sorted(set(no_decay) - set(PARAMETER_KINDS))
    if unknown:
        raise ValueError(f"unknown parameter kind(s) {unknown} in no_decay; choose from {', '.join(PARAMETER_KINDS)}")
    return no_decay


def weight_decay_groups(
    model: nn.Module, weight_decay: float, no_decay: Iterable[str] = NO_DECAY_DEFAULT
) -> list[dict]:
    """Two AdamW parameter groups, "decay" (at ``weight_decay``) and "no_decay" (at 0).

    Trainable parameters only, each once (tied parameters are one parameter), in model order
    within each group so every rank builds the same groups. An empty group is left out.
    """
    exempt = set(check_no_decay(no_decay))
    kinds = parameter_kinds(model)
    parameters = dict(model.named_parameters())
    groups = {"decay": [], "no_decay": []}
    for name, kind in kinds.items():
        if parameters[name].requires_grad:
            groups["no_decay" if kind in exempt else "decay"].append(parameters[name])
    return [
        {"name": name, "params": members, "weight_decay": weight_decay if name == "decay" else 0.0}
        for name, members in groups.items()
        if members
    ]


def describe_groups(groups: list[dict]) -> dict[str, dict]:
    """{group name: {"weight_decay", "tensors", "parameters"}} for logs and metrics."""
    return {
        group["name"]: {
            "weight_decay": group["weight_decay"],
            "tensors": len(group["params"]),
            "parameters": sum(p.numel() for p in group["params"]),
        }
        for group in groups
    }
