"""Device, precision, allocator and shard choices shared by the embed, train and predict stages."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence, TypeVar

import torch

from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.setting_flags import setting

T = TypeVar("T")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(choice: str = DEFAULT_DEVICE) -> torch.device:
    """`auto` picks CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if choice not in DEVICES:
        raise DesamError(f"unknown device {choice!r}; choose auto, cpu or cuda")
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DesamError("--device cuda was asked for but torch sees no CUDA device")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 on CPU (3x faster there for SAM's ViT) and on CUDA where supported, else fp16."""
    if precision not in PRECISIONS:
        raise DesamError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise DesamError("fp16 autocast is not supported on CPU; use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """torch.autocast for bf16/fp16, a no-op for fp32."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=_DTYPES[precision]):
        yield


def tune_malloc() -> None:
    """Stop glibc from returning SAM's large attention buffers to the kernel after every block.

    Measured on 2 CPU cores: about 2x faster ViT forward. A no-op where glibc is absent.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 2 ** 30)
        libc.mallopt(m_trim_threshold, 2 ** 31 - 1)
    except (OSError, AttributeError):
        return


def shard_spec(num_parts: int | None = None, part_id: int | None = None) -> tuple[int, int]:
    """(number of parts, this part) from the flags, or from torchrun's WORLD_SIZE/RANK, else (1, 0)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if num_parts is None and part_id is None:
        num_parts, part_id = world_size, int(os.environ.get("RANK", 0))
    elif world_size > 1:
        raise DesamError("--num-parts/--part-id are for separate processes; under torchrun the ranks are the parts")
    elif num_parts is None or part_id is None:
        raise DesamError("--num-parts and --part-id go together")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise DesamError(f"--part-id must be in 0..{num_parts - 1} for --num-parts {num_parts}, got {part_id}")
    return num_parts, part_id


def shard(items: Sequence[T], num_parts: int, part_id: int) -> list[T]:
    """The items of one part: every num_parts-th item starting at part_id (sorted input -> stable split)."""
    return list(items)[part_id::num_parts]


def device_setting() -> Any:
    """The `--device` setting of every command that computes: auto (CUDA when available, else CPU), cpu or cuda."""
    return setting(DEFAULT_DEVICE, choices=DEVICES)


@dataclass(frozen=True)
class DeviceSettings:
    """The device alone, for a command with no other settings object (desam_plan_and_embed)."""
    device: str = device_setting()
