"""Counts every torch.distributed collective of a process (benchmarks/step_overhead.py loads it).

Active when PERFORMER_COLLECTIVES_DIR is set: each collective function of torch.distributed is
wrapped to record its kind, its payload (bytes of the tensors it was handed), its wall time and
where it was called from: the first frame in the project (launcher/, performer/, data/) and the
first in DeepSpeed. A collective called inside another (all_gather_object's all_gathers) counts
once, as the outer one. The records go to <dir>/rank<RANK>-<pid>.json when the process ends, by
os._exit too (the trainer ends that way); processes that ran none (data loader workers, which
inherit RANK) write nothing.
"""

from __future__ import annotations

import os

DIRECTORY = os.environ.get("PERFORMER_COLLECTIVES_DIR")

if DIRECTORY:
    import collections
    import json
    import sys
    import threading
    import time

    import torch
    import torch.distributed as dist

    KINDS = (
        "all_reduce",
        "reduce_scatter_tensor",
        "reduce_scatter",
        "all_gather_into_tensor",
        "all_gather",
        "broadcast",
        "reduce",
        "gather",
        "scatter",
        "barrier",
        "all_to_all_single",
        "all_gather_object",
        "broadcast_object_list",
        "gather_object",
        "monitored_barrier",
    )
    PROJECT = tuple(os.sep + part + os.sep for part in ("launcher", "performer", "data", "benchmarks"))
    # Thin wrappers that say nothing about who asked: DeepSpeed's comm layer, our dist helpers, this file.
    WRAPPERS = (f"deepspeed{os.sep}comm{os.sep}", f"launcher{os.sep}dist.py", "collective_counter")
    records: dict[tuple, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    local = threading.local()

    def _payload(arguments, keywords) -> int:
        total = 0
        for value in list(arguments) + list(keywords.values()):
            tensors = value if isinstance(value, (list, tuple)) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
        return total

    def _ranks(group) -> int:
        """The ranks the collective spans (a group of one rank reaches nobody)."""
        try:
            return dist.get_world_size(group)
        except Exception:  # noqa: BLE001 - a group this process is not in, or no process group yet
            return 0

    def _sites() -> tuple[str, str]:
        ours = deepspeed = ""
        frame = sys._getframe(2)
        while frame is not None and not (ours and deepspeed):
            name = frame.f_code.co_filename
            if not deepspeed and f"{os.sep}deepspeed{os.sep}" in name and WRAPPERS[0] not in name:
                deepspeed = f"{name.rsplit(os.sep + 'deepspeed' + os.sep, 1)[1]}:{frame.f_code.co_name}"
            elif not ours and any(part in name for part in PROJECT) and not any(w in name for w in WRAPPERS[1:]):
                module = name.rsplit(os.sep, 2)
                ours = f"{module[-2]}/{module[-1]}:{frame.f_code.co_name}"
            frame = frame.f_back
        return ours, deepspeed

    def _wrap(kind: str, function):
        def counted(*arguments, **keywords):
            if getattr(local, "inside", False):
                return function(*arguments, **keywords)
            local.inside = True
            started = time.perf_counter()
            try:
                return function(*arguments, **keywords)
            finally:
                elapsed = time.perf_counter() - started
                local.inside = False
                ours, deepspeed = _sites()
                payload, asynchronous = _payload(arguments, keywords), bool(keywords.get("async_op"))
                record = records[(kind, payload, ours, deepspeed, asynchronous, _ranks(keywords.get("group")))]
                record[0] += 1
                record[1] += elapsed

        counted.__wrapped__ = function
        return counted

    for _kind in KINDS:
        if hasattr(dist, _kind):
            setattr(dist, _kind, _wrap(_kind, getattr(dist, _kind)))

    def _dump() -> None:
        if not records:
            return
        rank = os.environ.get("RANK", "0")
        rows = [
            {"kind": k, "bytes": b, "ours": o, "deepspeed": d, "async": a, "ranks": n, "count": c, "seconds": s}
            for (k, b, o, d, a, n), (c, s) in sorted(records.items(), key=lambda item: -item[1][0])
        ]
        with open(os.path.join(DIRECTORY, f"rank{rank}-{os.getpid()}.json"), "w") as handle:
            json.dump(rows, handle)

    _exit = os._exit

    def _exit_after_dump(code):
        _dump()
        _exit(code)

    os._exit = _exit_after_dump
    import atexit

    atexit.register(_dump)
