"""The features desam_predict decodes: the plan's frozen SAM encoder, or the embedding cache where it holds the slice."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from desam_pipeline.data import cache
from desam_pipeline.data.plan_io import plan_hash
from desam_pipeline.io.atomic import read_json
from desam_pipeline.network import encoders
from desam_pipeline.network.embedding import encode_slices, features_for_cache
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.paths import DATASET_PATTERN, get_root


class SliceEncoder:
    """The frozen image encoder of a plan, built on first use, returning cache-dtype features.

    Features are rounded to the plan's cache dtype (float16) like the cache the decoder was trained
    on, so a slice predicted from the cache and one encoded here give the same mask.
    """

    def __init__(self, plan: dict, checkpoint: Path, device: torch.device, precision: str):
        self.plan, self.checkpoint, self.device, self.precision = plan, checkpoint, device, precision
        self._module = None
        self.slices_encoded = 0

    def __call__(self, slices_uint8: np.ndarray, case: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self._module is None:
            self._module = encoders.load_image_encoder(self.plan["encoder"], self.checkpoint).to(self.device)
        neck, taps = encode_slices(self._module, slices_uint8, self.device, self.precision)
        arrays = features_for_cache(neck, taps, np.dtype(self.plan["cache_dtype"]), case)
        self.slices_encoded += len(slices_uint8)
        return torch.from_numpy(arrays["neck"]), [torch.from_numpy(arrays[f"tap{k}"]) for k in range(3)]


class CacheIndex:
    """The embedding cache of a plan, searched by volume content.

    The cache's input hash covers image and label, so a volume without its label cannot be found
    by hash. Instead: complete cases of the same plan hash with the same shape and affine are
    candidates (same case id first), and a cached slice is used only where its preprocessed
    uint8 slice equals the volume's, which with the same plan means the same features.
    """

    def __init__(self, cache_folder: Path | None, plan: dict):
        self.folder = cache_folder
        self.metas: dict[str, dict] = {}
        if cache_folder is not None:
            for case in cache.complete_cases(cache_folder, plan_hash(plan)):
                self.metas[case] = read_json(cache_folder / case / cache.META)

    def __len__(self) -> int:
        return len(self.metas)

    def lookup(self, case: str, shape: tuple[int, ...], affine: np.ndarray,
               slices: np.ndarray) -> tuple[dict, dict[int, int]]:
        """(opened cache case, {slice index: cache row}) for the usable cached slices; ({}, {}) if none."""
        shape, affine = [int(s) for s in shape], np.asarray(affine, dtype=float)
        order = sorted(self.metas, key=lambda c: c != case)
        for name in order:
            meta = self.metas[name]
            if meta["shape"] != shape or not np.array_equal(np.asarray(meta["affine"], dtype=float), affine):
                continue
            opened = cache.open_case(self.folder / name)
            rows = {int(z): row for row, z in enumerate(meta["z"])
                    if int(z) < len(slices) and np.array_equal(opened["image"][row], slices[int(z)])}
            if rows:
                return opened, rows
        return {}, {}


def cache_folder_of(model_folder: Path, plan: dict, preprocessed_root: str | os.PathLike | None = None
                    ) -> Path | None:
    """`<preprocessed>/<Dataset>/<plans_name>` for a model folder's dataset, None when it cannot be located."""
    dataset = Path(model_folder).parent.name
    if not DATASET_PATTERN.match(dataset):
        return None
    try:
        root = get_root("preprocessed", preprocessed_root)
    except DesamError:
        return None
    folder = cache.cache_dir(root / dataset, plan["plans_name"])
    return folder if folder.is_dir() else None
