"""What every desam network does with its weights: the inference state (all prediction needs besides SAM's
image encoder), a strict reload of it with a one-line error, and parameter counts per module."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from desam_pipeline.utilities.errors import DesamError


def inference_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of `net` (frozen prompt encoder included) detached, on CPU."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def load_inference_state(net: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike,
                         what: str) -> None:
    """Load `state` into `net` strictly; a missing, unexpected or mis-shaped key is one line naming `source`
    and saying it is not `what`."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        first = (wrong or missing or unexpected)[0]
        raise DesamError(f"{source}: not a {what} ({len(wrong)} mis-shaped, {len(missing)} missing, "
                         f"{len(unexpected)} unexpected keys; first: {first})")
    net.load_state_dict(state)


def parameter_counts(net: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, int]:
    """Parameters per named module (for the debug output), plus the net's trainable and total."""
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    counts["trainable"] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    counts["total"] = sum(p.numel() for p in net.parameters())
    return counts
