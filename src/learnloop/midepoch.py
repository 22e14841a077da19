"""Mid-epoch positions: where a fit stands inside an epoch, and a loader that continues from there.

A checkpoint written inside an epoch (a step checkpoint, a preemption) holds a `position`: the
epoch, the phase ('train', or 'valid' when training was over and validation is to run again),
the training batches done, the loader's `signature` and the random number generators as they
were when the epoch's training loader was started (`rng`). A resumed fit starts the loader again
from that state, so the sampler draws the same order, and `skip_batches` drops the first batches
in the sampler: their indices are drawn (cheap) but no item of them is fetched.

Which loaders can continue: a torch `DataLoader` over a map-style dataset, with any sampler or
batch sampler (shuffled, with a `generator=`, the batched `from_dd` path, a DistributedSampler
shard), with or without workers. An `IterableDataset` or another iterable cannot be skipped
into without replaying it: `can_skip` is False, and a resumed fit starts at the next epoch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

__all__ = [
    "can_skip",
    "fresh_iterator",
    "hand_over",
    "loader_signature",
    "signature_differences",
    "skip_batches",
]

# Loader facts that must be equal for a resume to continue the same batch order; world size
# is compared apart (see `signature_differences`).
_SAME = ("dataset_len", "batch_size", "drop_last", "shuffle", "batches")


def can_skip(dl: Any) -> bool:
    """Whether `skip_batches` can continue `dl` at a batch without replaying the ones before."""
    return isinstance(dl, DataLoader) and not isinstance(dl.dataset, IterableDataset)


def fresh_iterator(dl: Any) -> bool:
    """Whether `iter(dl)` makes a new iterator (it does unless persistent workers are reused).

    A new iterator draws its worker seed from the RNG before the sampler draws its order; a
    reused one draws only the order. A resume must replay the same draws.
    """
    return not (
        getattr(dl, "persistent_workers", False)
        and getattr(dl, "num_workers", 0) > 0
        and getattr(dl, "_iterator", None) is not None
    )


class _SkipFirst:
    """A sampler (or batch sampler) that drops its first `skip` entries; hooks run around the skip.

    `before()` runs when iteration starts, before the wrapped sampler draws its order; `after()`
    runs once the skipped entries are drawn, before the first kept entry is handed to the loader.
    """

    def __init__(
        self,
        inner: Any,
        skip: int,
        before: Callable[[], None] | None,
        after: Callable[[], None] | None,
    ) -> None:
        self.inner, self.skip, self.before, self.after = inner, skip, before, after
        # BatchSampler attributes some code reads (DataLoader's len for a batch_sampler).
        self.batch_size = getattr(inner, "batch_size", None)
        self.drop_last = getattr(inner, "drop_last", False)

    def __iter__(self) -> Iterator[Any]:
        if self.before is not None:
            self.before()
        it = iter(self.inner)
        for _ in range(self.skip):
            if next(it, _END) is _END:
                break
        if self.after is not None:
            self.after()
        yield from it

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)


_END = object()


def skip_batches(
    dl: DataLoader,
    skip: int,
    before: Callable[[], None] | None = None,
    after: Callable[[], None] | None = None,
) -> DataLoader:
    """A shallow copy of `dl` whose iteration starts at batch `skip`, fetching nothing before it.

    The copy shares `dl`'s dataset, sampler, generator and options; only its index sampler (the
    batch sampler, or the sampler of a loader with `batch_size=None`) is wrapped, so the first
    `skip` batches' indices are drawn and dropped. `before` and `after` run as `_SkipFirst` says.
    """
    if not can_skip(dl):
        raise TypeError(
            f"Cannot skip into {type(dl).__name__}: only a DataLoader over a map-style dataset can."
        )
    clone = copy.copy(dl)
    # A persistent iterator belongs to `dl`; the copy starts its own.
    object.__setattr__(clone, "_iterator", None)
    name = "batch_sampler" if dl.batch_sampler is not None else "sampler"
    # DataLoader forbids setting its samplers after construction; the copy is ours to change.
    object.__setattr__(clone, name, _SkipFirst(getattr(dl, name), skip, before, after))
    return clone


def hand_over(dl: Any, clone: Any) -> None:
    """Give `dl` the persistent workers' iterator that `clone` (from `skip_batches`) started.

    An uninterrupted fit starts persistent workers once and reuses them each epoch, which draws
    no worker seed; were the next epoch to start workers of its own from `dl`, it would draw one,
    and every random draw after it would differ. Call it once `clone`'s iteration has started.
    """
    iterator = getattr(clone, "_iterator", None)
    if clone is dl or iterator is None:
        return
    # Later epochs draw their whole order from `dl`'s sampler, not the skipping one.
    iterator._index_sampler = dl._index_sampler
    object.__setattr__(dl, "_iterator", iterator)


def _batch_size(dl: DataLoader) -> int | None:
    if dl.batch_size is not None:
        return dl.batch_size
    return getattr(dl.sampler, "batch_size", None) or getattr(
        dl.batch_sampler, "batch_size", None
    )


def _inner_sampler(dl: DataLoader) -> Any:
    sampler = dl.sampler
    # The batched path: a BatchSampler as the sampler.
    return getattr(sampler, "sampler", sampler) if dl.batch_size is None else sampler


def loader_signature(dl: Any, world: int) -> dict[str, Any]:
    """The facts of `dl` that fix its batch order: dataset length, batch size, shuffling, length.

    Under torchrun `dl` is this process's shard; `world` is the number of processes.
    """
    if not can_skip(dl):
        return {"kind": type(dl).__name__, "world_size": world}
    inner = _inner_sampler(dl)
    if isinstance(inner, DistributedSampler):
        shuffle = bool(inner.shuffle)
    else:
        shuffle = (
            "Sequential" not in type(inner).__name__
        )  # custom samplers count as shuffling
    drop = (
        dl.drop_last
        if dl.batch_size is not None
        else getattr(dl.sampler, "drop_last", False)
    )
    return {
        "kind": "DataLoader",
        "dataset_len": len(dl.dataset),
        "batch_size": _batch_size(dl),
        "drop_last": bool(drop),
        "shuffle": shuffle,
        "sampler": type(inner).__name__,
        "batches": len(dl) if world == 1 else None,
        "world_size": world,
    }


def signature_differences(
    saved: dict[str, Any], now: dict[str, Any]
) -> tuple[list[str], bool]:
    """What differs between two signatures, and whether only the world size does."""
    diffs = [
        f"{key} {saved.get(key)!r} then, {now.get(key)!r} now"
        for key in ("kind", *_SAME)
        if saved.get(key) is not None
        and now.get(key) is not None
        and saved.get(key) != now.get(key)
    ]
    if saved.get("world_size") != now.get("world_size"):
        diffs.append(
            f"world_size {saved.get('world_size')!r} then, {now.get('world_size')!r} now"
        )
        return diffs, len(diffs) == 1
    return diffs, False
