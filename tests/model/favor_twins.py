"""What the FAVOR+ op tests compare against: the naive composition and one upstream gradient."""

import torch

from performer.attention.favor import mask_keys
from performer.attention.naive import causal_linear_attention_quadratic, linear_attention_quadratic
from performer.feature_maps import favor_features


def upstream(out: torch.Tensor) -> torch.Tensor:
    """A non-uniform upstream gradient (L, D), so that every output column matters differently."""
    length, width = out.shape[-2:]
    return torch.linspace(-1, 1, width * length, device=out.device).reshape(length, width).to(out.dtype)


def output_and_grads(out: torch.Tensor, leaves) -> tuple[torch.Tensor, tuple]:
    """The output, detached, and the gradients of the leaves under ``upstream``."""
    return out.detach(), torch.autograd.grad((out * upstream(out)).sum(), leaves)


def naive(q, k, v, projection, key_padding=None, causal=False, a=None):
    """The composition the fused op and the kernels replace: feature map, padded keys removed,
    explicit kernel matrix. Returns ``output_and_grads`` for q, k, v."""
    phi_q = favor_features(q, projection, is_query=True, a=a)
    phi_k, values = mask_keys(favor_features(k, projection, is_query=False, a=a), v, key_padding)
    twin = causal_linear_attention_quadratic if causal else linear_attention_quadratic
    return output_and_grads(twin(phi_q, phi_k, values), (q, k, v))
