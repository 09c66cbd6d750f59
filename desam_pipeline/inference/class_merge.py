"""One label map from the per-structure predictions of a multi-structure model (one DeSAM per structure).

A voxel takes the value of the structure whose (thresholded, post-processed) mask holds it; where several
masks overlap, the structure with the highest probability wins; voxels in no mask are background 0.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def merge_structures(probabilities: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                     values: Sequence[int]) -> np.ndarray:
    """uint8 label map (the volume's shape) from each structure's probabilities, mask and label value."""
    held = np.stack([np.asarray(m, bool) for m in masks])
    scores = np.where(held, np.stack(probabilities), -np.inf)
    winner = np.asarray(values, np.uint8)[np.argmax(scores, axis=0)]
    return np.where(held.any(axis=0), winner, 0).astype(np.uint8)
