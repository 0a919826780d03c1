"""What a rank holds: the bytes of its model states (by role) and its peak resident set.

``model_state_bytes(engine)`` counts the tensors a DeepSpeed engine holds when it is called (the
trainer calls it after the backward, when weights, gradients and optimizer state are all alive),
whatever the ZeRO stage, by walking what the engine references instead of trusting a formula:

* parameters: every module parameter's storage, and under ZeRO-3 its partition (``ds_tensor``):
  the working (16-bit, or fp32) weights this rank holds;
* optimizer: the inner torch optimizer's parameters (the fp32 master weights, or their ZeRO
  partitions) and its state (Adam's two moments), and the wrapper's fp32 tensors
  named fp32 or master (ZeRO-3's fp32 partitions, outside the torch optimizer between steps);
* gradients: the module parameters' and the master weights' ``.grad``, and the tensors of the
  ZeRO wrapper whose attribute names say gradient (``averaged_gradients``, ``grads_in_partition``,
  ``grad_partitions_flat_buffer``...);
* buffers: every other tensor the ZeRO wrapper references (reduce buckets and other staging
  tensors; the flat buffers the 16-bit weights live in were already counted under parameters).

Tensors are deduplicated by the storage they live in and counted by the storage's size, so a
parameter that is a view into a flat buffer is counted once and a buffer is counted whole even if
only part of it is in use. ``torch.empty`` buffers count at their full size although a CPU
process's resident set only grows when they are written: on an accelerator they are allocated.
The walk follows lists, tuples, dicts and the attributes of DeepSpeed's and torch.optim's own
objects (not modules, process groups or anything else), to a bounded depth: cheap next to a
step, but a walk all the same, so the trainer calls it once per log interval.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator

import torch

ROLES = ("parameters", "gradients", "optimizer", "buffers")
_MASTER_WORDS = ("fp32", "master")


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024
    return max(peak, resident_bytes())  # the kernel's high-water mark can trail the current figure by a page or so


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    """(address, bytes) of the storage a tensor lives in; None for an empty or meta tensor."""
    if tensor.device.type == "meta":
        return None
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


def _walk(value, path: str, depth: int, visited: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(attribute path, tensor) for every tensor reachable from `value` through containers and
    DeepSpeed / torch.optim objects."""
    if isinstance(value, torch.Tensor):
        yield path, value
        partition = getattr(value, "ds_tensor", None)  # a ZeRO-3 parameter's own partition
        if isinstance(partition, torch.Tensor):
            yield path + ".ds_tensor", partition
        return
    if depth <= 0 or id(value) in visited or isinstance(value, (str, bytes, int, float, bool, type(None))):
        return
    visited.add(id(value))
    if isinstance(value, dict):
        for key, item in list(value.items()):
            yield from _walk(
                item, f"{path}[{key!r}]" if not isinstance(key, torch.Tensor) else f"{path}[param]", depth - 1, visited
            )
    elif isinstance(value, (list, tuple, set)):
        for index, item in enumerate(list(value)):
            yield from _walk(item, f"{path}[{index}]", depth - 1, visited)
    elif isinstance(value, torch.nn.Module):
        return  # the model's parameters are counted from the module itself
    elif type(value).__module__.startswith(("deepspeed.runtime", "torch.optim")) and hasattr(value, "__dict__"):
        for name, item in list(vars(value).items()):
            yield from _walk(item, f"{path}.{name}", depth - 1, visited)


def _role(name: str, tensor: torch.Tensor) -> str:
    """The role of a tensor the ZeRO wrapper holds, from its attribute name: gradients, fp32 master
    weights (ZeRO-3 keeps them in `fp32_partitioned_groups_flat` and hands them to the torch
    optimizer only during its step), or a buffer."""
    if "grad" in name:
        return "gradients"
    if tensor.dtype == torch.float32 and any(word in name for word in _MASTER_WORDS):
        return "optimizer"
    return "buffers"


def model_state_bytes(engine, max_depth: int = 8) -> dict[str, int]:
    """Bytes this rank holds per role (see the module docstring), and their total."""
    counted: set[tuple[int, int]] = set()
    totals = dict.fromkeys(ROLES, 0)

    def add(role: str, tensor: torch.Tensor) -> None:
        key = _storage_key(tensor)
        if key is not None and key not in counted:
            counted.add(key)
            totals[role] += key[1]

    module = engine.module
    for parameter in module.parameters():
        add("parameters", parameter)
        partition = getattr(parameter, "ds_tensor", None)
        if isinstance(partition, torch.Tensor):
            add("parameters", partition)
    for parameter in module.parameters():
        if parameter.grad is not None:
            add("gradients", parameter.grad)
    wrapper = engine.optimizer
    inner = getattr(wrapper, "optimizer", wrapper)  # the torch optimizer the ZeRO wrapper drives
    if isinstance(inner, torch.optim.Optimizer):
        for group in inner.param_groups:
            for master in group["params"]:
                add("optimizer", master)
                if master.grad is not None:
                    add("gradients", master.grad)
        for _, tensor in _walk(list(inner.state.values()), "state", max_depth, set()):
            add("optimizer", tensor)
    if wrapper is not None and wrapper is not inner:
        for path, tensor in _walk(wrapper, "optimizer", max_depth, set()):
            add(_role(path.rsplit(".", 1)[-1].lower(), tensor), tensor)
    totals["total"] = sum(totals[role] for role in ROLES)
    return totals
