"""Data-parallel sampling with exact resume.

Every epoch is a seeded permutation of the items (samples, or packed sequences when packing).
Global step k covers the contiguous slice `order[k*D*M : (k+1)*D*M]` (D = DP size, M = micro-
batch size) and DP rank r takes `[r*M : (r+1)*M]` of it: ranks are disjoint, the union over
ranks is the epoch, and a global step holds the same items under any split of D*M. The tail of
an epoch that does not fill a whole step on every rank is left out of that epoch (a different
tail every epoch, as the order is reshuffled) so that all ranks run the same number of steps.
The state is (epoch, position = micro-batches this rank has consumed in the epoch).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from megalora.data.errors import DataError
from megalora.data.pack import best_fit_decreasing, collate, packing_efficiency


@dataclass
class DataLoaderState:
    epoch: int = 0
    position: int = 0


class EpochSampler:
    """Which items each micro-batch of one DP rank holds, epoch by epoch."""

    def __init__(self, num_items: int, *, micro_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                 shuffle: bool = True, accumulation: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if micro_batch_size < 1:
            raise ValueError(f"`micro_batch_size` must be >= 1; got {micro_batch_size}")
        self.num_items, self.micro_batch_size = num_items, micro_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        if accumulation < 1:
            raise ValueError(f"gradient accumulation must be >= 1; got {accumulation}")
        self.per_step = micro_batch_size * dp_size
        # An epoch ends on a whole optimizer step (accumulation micro-rounds), so that every
        # split of one global batch into micro-batches, DP ranks and accumulation sees the
        # same items in the same optimizer step, across epoch ends too.
        self.steps_per_epoch = num_items // (self.per_step * accumulation) * accumulation
        self.num_dropped_per_epoch = num_items - self.steps_per_epoch * self.per_step

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def micro_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's micro-batches of `epoch`, in order (item indices)."""
        order = self.epoch_order(epoch)
        m, lo = self.micro_batch_size, self.dp_rank * self.micro_batch_size
        return [order[k * self.per_step + lo:k * self.per_step + lo + m] for k in range(self.steps_per_epoch)]


class _EpochBatches(torch.utils.data.Dataset):
    def __init__(self, loader: "BatchLoader", batches: list[np.ndarray]):
        self.loader, self.batches = loader, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return self.loader.collate_items(self.batches[k])


class BatchLoader:
    """Endless iterator of this DP rank's micro-batches (see `megalora.data.pack` for the batch format)."""

    def __init__(self, dataset, *, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, packing: bool = False,
                 max_length: int | None = None, pad_to_multiple_of: int = 1, seed: int = 42, epoch: int = 0,
                 pad_token_id: int = 0, num_workers: int = 0, shuffle: bool = True, accumulation: int = 1):
        self.dataset, self.pad_token_id, self.num_workers = dataset, pad_token_id, num_workers
        self.pad_to_multiple_of, self.packing = pad_to_multiple_of, packing
        lengths = dataset.lengths
        if packing:
            if max_length is None:
                raise ValueError("packing needs `max_length` (the packed sequence length)")
            self.bins = best_fit_decreasing(lengths, max_length)
            self.packing_efficiency = packing_efficiency(lengths, self.bins, max_length)
        else:
            self.bins = [[i] for i in range(len(dataset))]
            self.packing_efficiency = None
        self.sampler = EpochSampler(len(self.bins), micro_batch_size=micro_batch_size, dp_rank=dp_rank,
                                    dp_size=dp_size, seed=seed, shuffle=shuffle,
                                    accumulation=accumulation)
        if self.sampler.steps_per_epoch == 0:
            what = "packed sequences" if packing else "samples"
            raise DataError(f"{len(self.bins)} {what} cannot fill one micro-batch of {micro_batch_size} on each of "
                            f"{dp_size} data-parallel ranks")
        self.state = DataLoaderState(epoch=epoch, position=0)

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["position"] <= self.batches_per_epoch:
            raise DataError(f"data loader state {state} does not fit an epoch of {self.batches_per_epoch} "
                            "micro-batches")
        self.state = DataLoaderState(epoch=int(state["epoch"]), position=int(state["position"]))

    def collate_items(self, items: np.ndarray) -> dict[str, torch.Tensor]:
        rows = [[self.dataset[i] for i in self.bins[int(item)]] for item in items]
        return collate(rows, pad_token_id=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def _epoch_rest(self) -> Iterator[dict[str, torch.Tensor]]:
        rest = self.sampler.micro_batches(self.state.epoch)[self.state.position:]
        if self.num_workers <= 0:
            return (self.collate_items(items) for items in rest)
        return iter(torch.utils.data.DataLoader(_EpochBatches(self, rest), batch_size=None, shuffle=False,
                                                num_workers=self.num_workers))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            for batch in self._epoch_rest():
                # Counted before the hand-over: a state saved after using this batch resumes after it.
                self.state.position += 1
                yield batch
            self.state = DataLoaderState(epoch=self.state.epoch + 1, position=0)


def make_batches(dataset, *, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, packing: bool = False,
                 max_length: int | None = None, pad_to_multiple_of: int = 1, seed: int = 42, epoch: int = 0,
                 pad_token_id: int = 0, num_workers: int = 0, shuffle: bool = True) -> BatchLoader:
    """This DP rank's micro-batch iterator over `dataset` (endless; `batches_per_epoch` per epoch).

    `pad_token_id` is the tokenizer's pad id; `shuffle=False` keeps the dataset order (evaluation)."""
    return BatchLoader(dataset, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size, packing=packing,
                       max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, seed=seed, epoch=epoch,
                       pad_token_id=pad_token_id, num_workers=num_workers, shuffle=shuffle)
