"""Test-only observer: records the FAVOR+ projection every attention layer computes with.

Put this directory on PYTHONPATH and set PERFORMER_TEST_PROJECTION_LOG to a directory: every
process that runs a FAVOR+ attention then appends one JSON line per call to
``<dir>/rank<R>-<pid>.jsonl``: the layer's projection id, "train" (training mode with gradients)
or "eval", and the sha256 of the projection tensor it was handed. It reads what the op is given,
not what the trainer reports, so a test can hold the trainer to the projections it really used.
"""

import os

_DIRECTORY = os.environ.get("PERFORMER_TEST_PROJECTION_LOG")

if _DIRECTORY:
    import hashlib
    import json

    import torch

    from performer.attention import module as _module

    _original_attend = _module.Attention._attend
    _log = []

    def _record(line: str) -> None:
        if not _log:
            name = f"rank{os.environ.get('RANK', '0')}-{os.getpid()}.jsonl"
            _log.append(open(os.path.join(_DIRECTORY, name), "a", buffering=1))
        _log[0].write(line + "\n")

    def _observed_attend(self, q, k, v, mask, causal):
        if self.kernel == "favor":
            digest = hashlib.sha256(self.projection.detach().float().cpu().numpy().tobytes()).hexdigest()
            mode = "train" if self.training and torch.is_grad_enabled() else "eval"
            _record(json.dumps({"id": self.projection_id, "mode": mode, "sha256": digest}))
        return _original_attend(self, q, k, v, mask, causal)

    _module.Attention._attend = _observed_attend
