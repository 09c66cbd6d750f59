"""What a resumed or repeated training run needs to be the same run: the global RNG states (saved in
every checkpoint, restored on resume), the versions of the packages that decide the numbers, and the
processor and thread count they ran on (a run is bit-identical only when all of these are the same)."""
from __future__ import annotations

import importlib.metadata
import platform
import random
from pathlib import Path

import numpy as np
import torch


def versions() -> dict[str, str]:
    """Versions of Python and the packages that decide a run's numbers, recorded in debug.json."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for package in ("segment-anything", "onnxruntime", "desam"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def compute() -> dict[str, str | int]:
    """Where the numbers were computed: torch's intra-op threads, the CPU's vector instruction set torch uses
    and the processor's name. The order of floating-point reductions, and so the last bits of every result
    (which training amplifies), depends on them."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    return {"torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": name}


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch global RNG states, as plain lists and tensors (weights_only-loadable)."""
    numpy_state = np.random.get_state(legacy=False)
    return {"python": random.getstate(),
            "numpy": {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"],
                      "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]},
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.asarray(numpy_state["key"], np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    torch.set_rng_state(state["torch"])
