"""launcher/memory.py: what a rank holds, counted from the tensors themselves."""

import torch

from launcher.memory import model_state_bytes, peak_resident_bytes, resident_bytes


class _Engine:
    """The two attributes model_state_bytes reads from a DeepSpeed engine."""

    def __init__(self, module, optimizer):
        self.module, self.optimizer = module, optimizer


class _ZeroWrapper:
    """Stands in for a DeepSpeed ZeRO optimizer: a flat 16-bit buffer the weights are views of,
    fp32 master partitions, a gradient partition and a reduce bucket."""

    def __init__(self, module, flat, inner):
        self.optimizer = inner
        self.bit16_groups_flat = [flat]
        self.bit16_groups = [list(module.parameters())]
        self.fp32_partitioned_groups_flat = [torch.zeros(flat.numel() // 2)]
        self.averaged_gradients = {0: [torch.zeros(flat.numel() // 2, dtype=torch.bfloat16)]}
        self.ipg_bucket = {"buffer": [torch.empty(1000, dtype=torch.bfloat16)]}
        self.nested = [self.bit16_groups_flat, {"again": flat[:10]}]  # shared storage: counted once


_ZeroWrapper.__module__ = "deepspeed.runtime.zero.fake"  # the walk follows DeepSpeed's own objects only


def _step(module, optimizer):
    optimizer.zero_grad()
    module(torch.randn(2, 16)).sum().backward()
    optimizer.step()


def test_plain_adamw_counts_weights_gradients_and_both_moments():
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    parameters = sum(p.numel() for p in module.parameters())
    optimizer = torch.optim.AdamW(module.parameters())
    _step(module, optimizer)
    held = model_state_bytes(_Engine(module, optimizer))
    steps = 4 * len(optimizer.state)  # AdamW's scalar step counters
    assert held["parameters"] == 4 * parameters
    assert held["gradients"] == 4 * parameters
    assert held["optimizer"] == 8 * parameters + steps
    assert held["buffers"] == 0
    assert held["total"] == 16 * parameters + steps


def test_views_of_one_flat_buffer_count_once_and_wrapper_tensors_get_their_role():
    module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 4))
    parameters = sum(p.numel() for p in module.parameters())
    flat = torch.zeros(parameters, dtype=torch.bfloat16)
    offset = 0
    for parameter in module.parameters():  # the weights become views into the flat buffer
        parameter.data = flat[offset : offset + parameter.numel()].view_as(parameter)
        offset += parameter.numel()
    inner = torch.optim.AdamW([torch.zeros(parameters // 2, requires_grad=True)])
    held = model_state_bytes(_Engine(module, _ZeroWrapper(module, flat, inner)))
    assert held["parameters"] == 2 * parameters  # one bf16 storage, however many views
    assert held["optimizer"] == 4 * (parameters // 2) * 2  # the torch optimizer's parameter + the fp32 partition
    assert held["gradients"] == 2 * (parameters // 2)
    assert held["buffers"] == 2 * 1000
    assert held["total"] == sum(held[role] for role in ("parameters", "gradients", "optimizer", "buffers"))


def test_resident_figures():
    assert 0 < resident_bytes() <= peak_resident_bytes()
