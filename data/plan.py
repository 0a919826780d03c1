"""The order of an epoch, planned in O(shards): what a stream reads, and in which order.

An epoch of a split is a stream of tokens: its documents, each followed by eos, in the epoch's
order, cut into rows of `raw_length` tokens. The order is a pure function of (seed, epoch) and
the good shards, and it is never written out document by document:

1. **Shards.** The good shards, permuted (`shuffle`), then cut into *windows* of at most
   `interleave_shards` consecutive shards (spread evenly: no window is a remnant of a few). A
   window's place in the token stream is known from the manifest's per-shard counts alone
   (tokens + one eos per document): planning an epoch is a permutation and a cumulative sum over
   shards. Planning the next epoch costs the same.
2. **Windows, built lazily.** Only a reader that needs a row inside a window builds that window's
   document order, from the split index (memory-mapped) of its shards:
   - each shard's documents are cut into *blocks* of about BLOCK_TOKENS consecutive tokens (so the
     order depends on the documents' lengths only, not on how they were grouped into tar members);
     the blocks are permuted, and the documents inside each block;
   - the shards' sequences are then interleaved document by document in a random order (a random
     merge), so every stretch of the window draws from all its shards in proportion to their
     size, while each shard is still read block by block (a reader keeps one or two members per
     shard of the window in its cache). A window of fewer than `interleave_shards` shards (a
     small split) cuts each shard's permuted blocks into several runs and merges those, so that
     a stretch of the stream still draws from up to `interleave_shards` places of the split.
   A window of 32 shards of 10,000 documents is 320,000 documents: a few MB, built in tens of ms.
   Memory is bounded by the windows a reader holds (the current one, and the next epoch's first
   once the current epoch's last window is built), whatever the size of the split.

Displacement is bounded by a window, so this is a bounded shuffle: shards move anywhere, a
document stays within its window. A global batch draws from up to `interleave_shards` shards.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable

import numpy as np

BLOCK_TOKENS = 1 << 19  # tokens per block of a shard's documents (~ one packed member of uint16 ids)
_EPOCH_KEY, _WINDOW_KEY, _BLOCK_KEY = 0x5EED, 0x3A11, 0xB10C


@dataclasses.dataclass(frozen=True)
class ShardSizes:
    """What planning needs of the good shards, in manifest order: O(shards)."""

    positions: np.ndarray  # int64 (S,): each good shard's position in the manifest
    documents: np.ndarray  # int64 (S,): its documents
    tokens: np.ndarray  # int64 (S,): its tokens (eos not counted)

    @property
    def stream_tokens(self) -> np.ndarray:
        """int64 (S,): tokens each shard adds to an epoch's stream (an eos after every document)."""
        return self.tokens + self.documents


@dataclasses.dataclass(frozen=True)
class Window:
    """One window's documents in stream order (built by `SplitOrder.window`)."""

    shard: np.ndarray  # int64 (N,): manifest position of each document's shard
    document: np.ndarray  # int64 (N,): the document's index within its shard
    length: np.ndarray  # int64 (N,): its tokens (eos not counted)
    start: np.ndarray  # int64 (N,): offset of its first token in the epoch's token stream

    def __len__(self) -> int:
        return len(self.shard)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.shard, self.document, self.length, self.start))


@dataclasses.dataclass(frozen=True)
class EpochLayout:
    """Epoch e at the shard level: O(shards)."""

    epoch: int
    shards: np.ndarray  # int64 (S,): manifest positions in the epoch's order
    window_bounds: np.ndarray  # int64 (windows + 1,): each window's first shard in that order; last = S
    window_start: np.ndarray  # int64 (windows + 1,): each window's first token in the stream; last = total

    @property
    def windows(self) -> int:
        return len(self.window_start) - 1

    def window_shards(self, window: int) -> np.ndarray:
        return self.shards[self.window_bounds[window] : self.window_bounds[window + 1]]


class SplitOrder:
    """Every epoch's order over one split's good shards (module docstring).

    ``lengths(position)`` returns the token count of each document of the shard at that manifest
    position (a memory-mapped slice of the split index, or a version-1 shard's parsed lengths).
    Layouts and windows are kept in small caches: the ones in use and the next epoch's start.
    """

    def __init__(
        self,
        sizes: ShardSizes,
        lengths: Callable[[int], np.ndarray],
        *,
        seed: int,
        raw_length: int,
        interleave_shards: int = 32,
        shuffle: bool = True,
        cached_windows: int = 4,
    ):
        if interleave_shards < 1:
            raise ValueError(f"interleave_shards must be >= 1, not {interleave_shards}")
        self.sizes, self.lengths = sizes, lengths
        self.seed, self.raw_length = seed, raw_length
        self.interleave_shards, self.shuffle = interleave_shards, shuffle
        self.cached_windows = cached_windows
        self.total_tokens = int(sizes.stream_tokens.sum())
        self.rows = self.total_tokens // raw_length  # full rows per epoch: the same every epoch
        self._layouts: OrderedDict[int, EpochLayout] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], Window] = OrderedDict()

    # --- shard level ----------------------------------------------------------------------------
    def layout(self, epoch: int) -> EpochLayout:
        """Epoch ``epoch``'s shard order and window offsets (cached)."""
        layout = self._layouts.get(epoch)
        if layout is not None:
            self._layouts.move_to_end(epoch)
            return layout
        rng = np.random.default_rng([self.seed, epoch, _EPOCH_KEY])
        order = rng.permutation(len(self.sizes.positions)) if self.shuffle else np.arange(len(self.sizes.positions))
        per_shard = self.sizes.stream_tokens[order]
        # As many windows as interleave_shards asks, the shards spread evenly over them (no window
        # of a few leftover shards): window w holds shards [w*S//n, (w+1)*S//n) of the order.
        windows = -(-len(order) // self.interleave_shards)
        bounds = np.arange(windows + 1, dtype=np.int64) * len(order) // max(windows, 1)
        window_tokens = np.add.reduceat(per_shard, bounds[:-1]) if len(order) else np.zeros(0, np.int64)
        layout = EpochLayout(
            epoch=epoch,
            shards=self.sizes.positions[order],
            window_bounds=bounds,
            window_start=np.concatenate(([0], np.cumsum(window_tokens))).astype(np.int64),
        )
        self._layouts[epoch] = layout
        while len(self._layouts) > 3:
            self._layouts.popitem(last=False)
        return layout

    def windows_overlapping(self, epoch: int, begin: int, end: int) -> range:
        """Windows holding tokens [begin, end) of the epoch's stream."""
        starts = self.layout(epoch).window_start
        first = int(np.searchsorted(starts, begin, side="right")) - 1
        last = int(np.searchsorted(starts, end, side="left"))
        return range(max(first, 0), min(last, len(starts) - 1))

    # --- document level -------------------------------------------------------------------------
    def window(self, epoch: int, window: int) -> Window:
        """The window's documents in stream order (built on first use, then cached). Building an
        epoch's last window also prepares the next epoch, so that no reader waits at the boundary."""
        key = (epoch, window)
        built = self._windows.get(key)
        if built is not None:
            self._windows.move_to_end(key)
            return built
        layout = self.layout(epoch)
        if window == layout.windows - 1 and (epoch + 1, 0) not in self._windows:
            self._keep((epoch + 1, 0), self._build(self.layout(epoch + 1), 0))
        built = self._build(layout, window)
        self._keep(key, built)
        return built

    def _keep(self, key: tuple[int, int], window: Window) -> None:
        self._windows[key] = window
        while len(self._windows) > self.cached_windows:
            self._windows.popitem(last=False)

    def _build(self, layout: EpochLayout, window: int) -> Window:
        shards = layout.window_shards(window)
        # A window merges `interleave_shards` sequences: one per shard, or, where a window holds
        # fewer shards (a small split), each shard's blocks split into several runs, so that a
        # split of a few shards is mixed as well as a large one.
        runs = max(1, self.interleave_shards // len(shards))
        sequences = [self._shard_sequence(layout.epoch, int(p), runs) for p in shards]
        documents = np.concatenate([s[0] for s in sequences])
        lengths = np.concatenate([s[1] for s in sequences])
        owner = np.repeat(np.arange(len(shards)), [len(s[0]) for s in sequences])  # shard of the window
        # Sequence of each entry, nondecreasing in this shard-major order (a shard's runs are in order).
        sequence = owner * runs + np.concatenate([s[2] for s in sequences])
        if self.shuffle and int(sequence[-1]) > 0:
            # A random merge: a random order of the sequences' labels; the k-th label of sequence q
            # takes q's k-th document, so each sequence keeps its own block-by-block order.
            rng = np.random.default_rng([self.seed, layout.epoch, window, _WINDOW_KEY])
            labels = rng.permutation(sequence)
            slots = np.argsort(labels, kind="stable")  # entry i (shard-major) goes to stream slot slots[i]
            order = np.empty_like(slots)
            order[slots] = np.arange(len(slots))  # stream slot t holds entry order[t]
            owner, documents, lengths = owner[order], documents[order], lengths[order]
        start = np.empty(len(lengths), dtype=np.int64)
        start[0] = layout.window_start[window]
        np.cumsum(lengths[:-1] + 1, out=start[1:])
        start[1:] += layout.window_start[window]
        return Window(shard=shards[owner].astype(np.int64), document=documents, length=lengths, start=start)

    def _shard_sequence(self, epoch: int, position: int, runs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One shard's documents in this epoch's order, their lengths, and the run (0..runs-1,
        nondecreasing) each belongs to: blocks of ~BLOCK_TOKENS consecutive tokens permuted, the
        documents of each block permuted, the permuted blocks dealt into `runs` consecutive runs."""
        lengths = np.asarray(self.lengths(position), dtype=np.int64)
        if not self.shuffle or len(lengths) <= 1:
            return np.arange(len(lengths), dtype=np.int64), lengths, np.zeros(len(lengths), dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch, position, _BLOCK_KEY])
        before = np.cumsum(lengths) - lengths  # tokens of the shard before each document
        block = before // BLOCK_TOKENS
        blocks = int(block[-1]) + 1
        # Sort by (permuted block, random key): blocks in a random order, documents shuffled inside.
        block_rank = rng.permutation(blocks)[block]
        order = np.lexsort((rng.random(len(lengths)), block_rank))
        runs = min(runs, blocks)
        run = np.searchsorted(np.arange(runs) * blocks // runs, block_rank[order], side="right") - 1
        return order.astype(np.int64), lengths[order], run.astype(np.int64)

    def documents(self, epoch: int, begin: int, end: int) -> list[tuple[Window, int, int]]:
        """The documents holding tokens [begin, end) of the epoch's stream, as (window, first, stop)
        slices of the windows that hold them, in stream order."""
        pieces = []
        for w in self.windows_overlapping(epoch, begin, end):
            window = self.window(epoch, w)
            first = max(int(np.searchsorted(window.start, begin, side="right")) - 1, 0)
            stop = int(np.searchsorted(window.start, end, side="left"))
            if stop > first:
                pieces.append((window, first, stop))
        return pieces
