"""The networks a fold checkpoint can hold, by class name: the one place that maps `network_config` to a class.

A checkpoint's `network_config` names its class (`network`; checkpoints of DeSAM written before there
were others lack it). Every network here takes (neck, taps, points= or boxes=) and gives mask logits of
4x its embedding grid with the predicted IoU.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from desam_pipeline.network.coupled import CoupledSAM
from desam_pipeline.network.desam import DeSAM
from desam_pipeline.utilities.errors import DesamError

NETWORKS: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in (DeSAM, CoupledSAM)}
MASK_SCALE = 4  # SAM's mask upscaling: masks are 4x the embedding grid (256 px for a 64 grid)


def network_class(config: Mapping, source: str | os.PathLike = "checkpoint") -> type[nn.Module]:
    """The class a network_config names; an unknown name is a one-line error naming `source`."""
    name = config.get("network", DeSAM.__name__)
    if name not in NETWORKS:
        raise DesamError(f"{source}: network {name!r} is not one desam can rebuild ({', '.join(NETWORKS)})")
    return NETWORKS[name]


def rebuild_network(state: Mapping[str, torch.Tensor], config: Mapping,
                    source: str | os.PathLike = "checkpoint") -> nn.Module:
    """The trained network of a checkpoint, from its weights and network_config."""
    return network_class(config, source).from_inference_state(state, config, source=source)


def mask_size(net: nn.Module) -> int:
    """The side in pixels of the masks `net` predicts."""
    return MASK_SCALE * int(net.config["embedding_grid"])
