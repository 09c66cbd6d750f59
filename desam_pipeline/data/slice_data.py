"""Training samples from the embedding cache: one cached slice and its sampled prompt at a time.

Each read maps the case's .npy file, copies one slice out and drops the mapping, so a process
holds one batch of features, never whole arrays; a mapping kept open for the epoch would leave
every slice it touched resident in the process (and counted in its RSS), so memory would grow
with the cache.

Prompts are drawn per sample from `np.random.default_rng([seed, stream, epoch, index])`: they
depend only on which slice is drawn in which epoch, not on the worker, batch or process that
reads it. That makes runs seeded and resumable, and lets DDP ranks draw the same prompts as one
process would. Samplers yield `(epoch, index)` pairs so that persistent workers see the epoch.
A training slice of a case cached with augmented views is read from one of its views (the original or
one of the K), drawn the same way from a generator of its own, so caches without views draw as before.
Views that move pixels (`scale`) bring their own label and object footprint; which slices hold the object
(the balanced draw) is the original's, and a view that zoomed the object out of a slice gives a click off
it (`prompts.sample_training_points` falls back to the side the slice has);
`use_views=False` reads the originals only, so one cache with views also serves runs without them.
`slices` narrows the cached slices with the embedding's own rules (`slice_selection.select_slices`), so a cache of
every slice (`--slices all`) can train on exactly the slices a default plan would have cached.
`structures` (label values) trains structures of a multi-structure cache (labels keep their classes): the target
of a sample of structure value v is label == v, and every other structure is background. One value trains one
structure's network; several train a joint one, each sample drawn for one structure (its index in `structure`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from desam_pipeline.data import cache, prompts
from desam_pipeline.data.prompts import MODES
from desam_pipeline.data.slice_selection import SLICE_MODES, select_slices
from desam_pipeline.io.atomic import read_json
from desam_pipeline.utilities.errors import DesamError

FEATURES = ("neck", "tap0", "tap1", "tap2")
# How training samples are drawn from the cached slices (see SliceDataset).
SAMPLINGS = ("balanced", "slices")
TRAIN_STREAM, VAL_STREAM = 0, 1
DEFAULT_LOADER_TIMEOUT_S = 300.0


def read_slice(path: Path, index: int) -> np.ndarray:
    """Slice `index` of a cached .npy array, copied out of a mapping that is closed again at once."""
    array = np.load(path, mmap_mode="r")
    try:
        return np.array(array[index])
    finally:
        del array


def structure_target(label: np.ndarray, label_value: int | None) -> np.ndarray:
    """The training target of a cached label slice: as cached (label > 0), or label == `label_value`."""
    return label if label_value is None else (np.asarray(label) == label_value).astype(np.uint8)


def label_summary(case_dir: Path, label_value: int | None = None,
                  label_name: str = "label") -> tuple[list[bool], np.ndarray]:
    """Per cached slice of the case, whether its cached label (array `label_name`) holds the object (structure
    `label_value` when given), and the object's footprint: (H,W) bool, where any cached slice of the case has
    it. Read slice by slice from the mapped label array."""
    labels = np.load(case_dir / f"{label_name}.npy", mmap_mode="r")
    has_object, footprint = [], np.zeros(labels.shape[1:], bool)
    for s in range(len(labels)):
        target = np.asarray(structure_target(labels[s], label_value)) > 0
        has_object.append(bool(target.any()))
        footprint |= target
    return has_object, footprint


def cached_positions(z: Sequence[int], has_object: Sequence[bool], slices: str) -> list[int]:
    """Positions in a case's cache (slice numbers `z`, object flags `has_object`) of the slices
    `select_slices(..., slices)` picks among the cached ones."""
    if slices == "all":
        return list(range(len(z)))
    foreground_z = [int(z[s]) for s in range(len(z)) if has_object[s]]
    chosen = set(select_slices(foreground_z, max(z) + 1, slices)) if len(z) else set()
    return [s for s in range(len(z)) if int(z[s]) in chosen]


class SliceDataset(Dataset):
    """Cached slices of the given case folders; item (epoch, index) -> features, label, prompt.

    `sampling="slices"`: every cached slice once per epoch (once per structure of a joint network), its click
    on or off the object with probability 1:1 (a slice without the object can only give a click off it).
    `sampling="balanced"` (grid mode): the method's 1:1 draw of object and background clicks, whatever share
    of the slices is empty: an epoch is every slice with the object once with a click on it (per structure),
    plus as many clicks off the object, each on a slice drawn uniformly from all the cached slices (empty ones
    included, so the mask module also learns "nothing here"), for a structure drawn uniformly. Box mode has
    no click: every slice once (per structure).
    """

    def __init__(self, case_dirs: Sequence[Path], mode: str, seed: int, stream: int = TRAIN_STREAM, *,
                 sampling: str, frame: int, use_views: bool = True, slices: str = "all",
                 structures: Sequence[int | None] = (None,), hard_negatives: float):
        """`frame`: side of the prompt frame the points and boxes are drawn in (the network's `prim.frame`);
        `use_views`: draw among a case's cached augmented views (training stream only); `slices`: which of
        the cached slices to use, by the embedding's rule (`all`: every cached slice); `sampling`: see the
        class docstring; `structures`: the label values to train, one per structure index (None: label > 0);
        `hard_negatives`: grid mode, the probability that a click off the object is drawn inside the case's
        footprint of that structure (`prompts.sample_training_points`)."""
        if mode not in MODES:
            raise DesamError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if slices not in SLICE_MODES:
            raise DesamError(f"unknown slice selection {slices!r}; choose one of {', '.join(SLICE_MODES)}")
        if sampling not in SAMPLINGS:
            raise DesamError(f"unknown sampling {sampling!r}; choose one of {', '.join(SAMPLINGS)}")
        self.case_dirs = [Path(d) for d in case_dirs]
        self.mode, self.seed, self.stream, self.frame = mode, int(seed), int(stream), int(frame)
        self.structures = list(structures)
        if not self.structures:
            raise DesamError("no structure to train")
        self.entries: list[tuple[int, int]] = []  # (case, cached slice)
        self.views: list[int] = []  # augmented views per case, drawn from in the training stream only
        self.positives: list[tuple[int, int, int]] = []  # (structure, case, slice) where the slice holds it
        self.labels: list[list[str]] = []  # per case and view, the label array's name
        self.footprints: list[list[list[np.ndarray]]] = []  # per case, structure and view: where any slice has it
        self.hard_negatives = float(hard_negatives)
        for c, case_dir in enumerate(self.case_dirs):
            meta = read_json(case_dir / "meta.json")
            self.views.append(int(meta.get("views", 0)) if self.stream == TRAIN_STREAM and use_views else 0)
            self.labels.append([cache.label_array(meta, v) for v in range(self.views[c] + 1)])
            summaries = [label_summary(case_dir, value) for value in self.structures]
            # the training slices follow where any of the structures is (one structure: where it is)
            positions = cached_positions(meta["z"], [any(flags) for flags in zip(*(h for h, _ in summaries))], slices)
            self.entries.extend((c, s) for s in positions)
            self.footprints.append([[footprint if name == "label" else label_summary(case_dir, value, name)[1]
                                     for name in self.labels[c]]
                                    for value, (_, footprint) in zip(self.structures, summaries)])
            for k, (has_object, _) in enumerate(summaries):
                self.positives.extend((k, c, s) for s in positions if has_object[s])
        self.positives.sort(key=lambda item: item[0])  # structure-major: one structure's order as before
        self.sampling = sampling
        self.balanced = sampling == "balanced" and mode == "grid" and bool(self.positives)

    def __len__(self) -> int:
        return 2 * len(self.positives) if self.balanced else len(self.entries) * len(self.structures)

    def _draw(self, epoch: int, index: int) -> tuple[tuple[int, int, int], bool | None]:
        """((structure, case, slice), forced click side) of sample `index` in `epoch` (side None: the 1:1 coin
        of `slices`)."""
        if not self.balanced:
            return (index // len(self.entries), *self.entries[index % len(self.entries)]), None
        if index < len(self.positives):
            return self.positives[index], True
        rng = np.random.default_rng([self.seed, self.stream, int(epoch), int(index), 2])
        c, s = self.entries[int(rng.integers(len(self.entries)))]
        return (int(rng.integers(len(self.structures))) if len(self.structures) > 1 else 0, c, s), False

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, np.ndarray]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        (k, c, s), on_object = self._draw(epoch, index)
        case_dir = self.case_dirs[c]
        view = 0
        if self.views[c]:
            view = int(np.random.default_rng([self.seed, self.stream, int(epoch), int(index), 1]).integers(
                self.views[c] + 1))
        sample = {name: read_slice(case_dir / f"{cache.view_array(name, view)}.npy", s) for name in FEATURES}
        label = structure_target(read_slice(case_dir / f"{self.labels[c][view]}.npy", s), self.structures[k])
        sample["label"] = label
        sample["index"] = np.int64(index)
        sample["view"] = np.int64(view)
        sample["structure"] = np.int64(k)
        rng = np.random.default_rng([self.seed, self.stream, int(epoch), int(index)])
        if self.mode == "grid":
            coords, point_labels, iou_target = prompts.sample_training_points(
                label[None], rng, frame=self.frame, on_object=on_object, near=self.footprints[c][k][view][None],
                near_probability=self.hard_negatives)
            sample["coords"], sample["point_labels"], sample["iou_target"] = coords[0], point_labels[0], iou_target[0]
        else:
            sample["box"] = prompts.whole_box(1, self.frame)[0]
        return sample


class EpochSampler(Sampler):
    """Wraps an index sampler and yields (epoch, index), so workers draw the epoch's prompts."""

    def __init__(self, sampler: Sampler | Sequence[int]):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, int(i)) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def _worker_init(_: int) -> None:
    """Forked workers run torch ops (collation): one thread each, or they can deadlock after fork."""
    torch.set_num_threads(1)


def make_loader(dataset: SliceDataset, sampler: Sampler, batch_size: int, num_workers: int,
                pin_memory: bool = False, timeout_s: float = DEFAULT_LOADER_TIMEOUT_S) -> DataLoader:
    """A DataLoader over an EpochSampler: persistent workers, and a dead or stalled worker is an error.

    torch's watchdog turns a worker killed by a signal into a RuntimeError at the next batch;
    `timeout` turns a worker that stops answering into one after `timeout_s` seconds.
    """
    workers = max(int(num_workers), 0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, timeout=timeout_s if workers else 0,
                      worker_init_fn=_worker_init if workers else None, pin_memory=pin_memory,
                      prefetch_factor=2 if workers else None)


def train_sampler(dataset: SliceDataset, seed: int, world_size: int = 1, rank: int = 0) -> EpochSampler:
    """Per-epoch reshuffle via DistributedSampler (also for one process), so DDP changes nothing else.

    Rank r takes positions r, r+W, r+2W, ... of the epoch's permutation, so the union of the ranks'
    t-th batches is exactly the t-th batch one process takes with the global batch size.
    """
    return EpochSampler(DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True,
                                           seed=seed, drop_last=False))


def val_sampler(dataset: SliceDataset, world_size: int = 1, rank: int = 0) -> EpochSampler:
    """Every held-out slice once across the ranks (no padding, so all-reduced sums count each once)."""
    return EpochSampler(range(rank, len(dataset), world_size))


def loader_batches(loader: DataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate a loader, turning a dead or silent worker into a one-line DesamError."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as exc:
            text = str(exc)
            if "DataLoader worker" in text or "DataLoader timed out" in text:
                raise DesamError(f"data loader failed: {text.splitlines()[0]} (pid {os.getpid()}); "
                                 f"rerun with --num-workers 0 to see the error in this process") from exc
            raise
        yield batch
