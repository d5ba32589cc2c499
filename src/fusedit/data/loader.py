"""Batches addressed by training step, so a resumed run reads exactly the samples it would have read.

Step s reads dataset indices [s * B, (s + 1) * B) modulo the dataset length; the shapes dataset is a pure
function of its index, so the read position is just the step and needs no state of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fusedit.config import DataConfig


class StepBatches(Sampler[list[int]]):
    def __init__(self, length: int, batch_size: int, start_step: int, end_step: int):
        self.length, self.batch_size = length, batch_size
        self.start_step, self.end_step = start_step, end_step

    def __iter__(self) -> Iterator[list[int]]:
        b = self.batch_size
        for step in range(self.start_step, self.end_step):
            yield [(step * b + j) % self.length for j in range(b)]

    def __len__(self) -> int:
        return self.end_step - self.start_step


def collate(items: list[dict]) -> dict:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "index": torch.tensor([it["index"] for it in items]),
    }


def build_dataset(cfg: DataConfig, seed: int) -> Dataset:
    from fusedit.data.shapes import ShapesDataset

    return ShapesDataset(
        size=cfg.image_size,
        length=cfg.num_samples,
        seed=seed,
        kinds=tuple(cfg.kinds),
        max_objects=cfg.max_objects,
    )


def step_loader(cfg: DataConfig, seed: int, batch_size: int, start_step: int, end_step: int) -> DataLoader:
    dataset = build_dataset(cfg, seed)
    sampler = StepBatches(len(dataset), batch_size, start_step, end_step)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        persistent_workers=False,
        prefetch_factor=4 if cfg.num_workers else None,
    )
