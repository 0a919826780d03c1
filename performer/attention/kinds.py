"""The one attention vocabulary, and the guide's names mapped onto it.

A kernel is what computes attention: "favor" (FAVOR+ random-feature linear attention, O(n)) or
"softmax" (exact, O(n^2)). Configs (``ModelConfig.attention_type``, the run config's
``model.attention_type``) name kernels. The guide's layer API names a self-attention by kernel
and causality together: "linear" (bidirectional FAVOR+), "causal_linear" (causal FAVOR+) or
"softmax" (causal when the layer masks the future). Both directions of the mapping live here.
"""

from __future__ import annotations

KERNELS = ("favor", "softmax")

# guide name -> kernel
GUIDE_ATTENTION_TYPES = {"softmax": "softmax", "linear": "favor", "causal_linear": "favor"}
GUIDE_CROSS_ATTENTION_TYPES = ("softmax", "linear")


def kernel_of(attention_type: str, name: str = "attention_type", allowed=tuple(GUIDE_ATTENTION_TYPES)) -> str:
    """The kernel of a guide attention type ("linear" -> "favor"); ValueError naming the argument."""
    if attention_type not in allowed:
        raise ValueError(f"{name}={attention_type!r}; choose one of {', '.join(allowed)}")
    return GUIDE_ATTENTION_TYPES[attention_type]


def guide_attention_type(kernel: str, causal: bool) -> str:
    """The guide's name for a self-attention of this kernel: ("favor", causal) -> "causal_linear"."""
    if kernel not in KERNELS:
        raise ValueError(f"attention kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "softmax":
        return "softmax"
    return "causal_linear" if causal else "linear"
