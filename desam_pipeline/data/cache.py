"""The embedding cache: one folder per case of plain .npy arrays that training memory-maps.

Layout: `<preprocessed>/<Dataset>/<plans_name>/<case>/` with image.npy, label.npy, neck.npy,
tap0..2.npy (shapes in the plan: they depend on the encoder family) and meta.json, plus `<plans_name>/manifest.json`. A case folder is written under
a `.tmp-<pid>-<case>` name (arrays first, meta.json last, everything fsynced) and renamed
into place, so a folder named after a case is complete, also after `kill -9`. meta.json lists
every array file with its size in bytes (`files`): a case counts as complete only while each
of them is there with that size, so a file deleted or truncated since makes the case be
embedded again (folders written before sizes were recorded count as incomplete too).

Augmented views (plan entry `augmented_views`, see desam_pipeline.data.augmented_views): a case with K views
has meta.json `"views": K` and, for each view k = 1..K, `view<k>_image.npy` (the augmented uint8 slices)
and `view<k>_neck.npy`, `view<k>_tap0..2.npy`, each shaped like the original array. View 0 is the
original (the plain names). The label is shared by every view, except for views that move pixels (kind
`scale`): those have meta.json `"view_labels": true` and a `view<k>_label.npy` each. `view_array` and
`label_array` build these names.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from desam_pipeline.io.atomic import (file_lock, process_alive, read_json, temporary_name, temporary_owner,
                                     write_json)
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.io.safe_names import check_name
from desam_pipeline.utilities.errors import naming

META = "meta.json"
MANIFEST = "manifest.json"
REPLACED_SUFFIX = ".replaced"
_LOCK = ".manifest.lock"


def view_array(name: str, view: int) -> str:
    """File stem of array `name` in view `view`: the plain name for the original (0), `view<k>_<name>` else."""
    return name if view == 0 else f"view{view}_{name}"


def label_array(meta: dict, view: int) -> str:
    """File stem of the label of view `view` of a case with this meta.json: its own when the case's views move
    pixels (`view_labels`), else the shared `label`."""
    return view_array("label", view) if meta.get("view_labels") else "label"


def cache_dir(preprocessed_dataset_dir: str | os.PathLike, plans_name: str) -> Path:
    """Folder holding the case folders of one plan (a plain name: see safe_names)."""
    return Path(preprocessed_dataset_dir) / check_name(plans_name, "plans name")


def is_complete(case_dir: Path) -> bool:
    """A case folder is complete when it has its final name, its meta.json (written last) and every array
    file meta.json lists, with the size recorded there."""
    if case_dir.name.startswith(".") or not (case_dir / META).is_file():
        return False
    files = read_json(case_dir / META).get("files")
    if not isinstance(files, dict) or not files:
        return False
    for name, size in files.items():
        path = case_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def complete_cases(cache_dir: str | os.PathLike, plan_sha256: str | None = None) -> list[str]:
    """Sorted ids of the complete cases; only those made with `plan_sha256` when it is given."""
    folder = Path(cache_dir)
    if not folder.is_dir():
        return []
    cases = [child for child in folder.iterdir() if child.is_dir() and is_complete(child)]
    if plan_sha256 is not None:
        cases = [child for child in cases if read_json(child / META).get("plan_sha256") == plan_sha256]
    return sorted(child.name for child in cases)


def open_case(case_dir: str | os.PathLike) -> dict:
    """meta plus every array of a case, memory-mapped read-only (keys: meta, image, label, neck, tap0..)."""
    case_dir = Path(case_dir)
    case = {"meta": read_json(case_dir / META)}
    for path in sorted(case_dir.glob("*.npy")):
        case[path.stem] = np.load(path, mmap_mode="r")
    return case


def input_sha256(image_file: str | os.PathLike, label_file: str | os.PathLike) -> str:
    """One hash of a case's inputs: sha256 of the image file's and the label file's sha256."""
    return hashlib.sha256((file_sha256(image_file) + file_sha256(label_file)).encode()).hexdigest()


def case_status(case_dir: Path, input_hash: str, plan_hash: str) -> str:
    """'complete' (same inputs and plan), 'stale' (a complete folder made from other ones), 'incomplete'
    (a folder with meta.json whose files are not all there with their recorded sizes) or 'missing'."""
    if not is_complete(case_dir):
        return "incomplete" if (case_dir / META).is_file() else "missing"
    meta = read_json(case_dir / META)
    fresh = meta.get("input_sha256") == input_hash and meta.get("plan_sha256") == plan_hash
    return "complete" if fresh else "stale"


def temporary_case_dir(cache_dir: Path, case: str) -> Path:
    return cache_dir / temporary_name(case)


def _temporary_names(cases: list[str], pid: int) -> set[str]:
    """The temporary folder names process `pid` gives these cases (being written, or being replaced)."""
    return {temporary_name(case + suffix, pid) for case in cases for suffix in ("", REPLACED_SUFFIX)}


def remove_case_temporaries(cache_dir: str | os.PathLike, cases: list[str]) -> int:
    """Delete the temporary folders that killed runs left for these cases; return how many.

    Only the caller's cases (other parts of a sharded run, maybe on other machines, may be writing
    theirs right now), and only those of processes no longer running (a concurrent run of the same
    cases may be writing them).
    """
    folder = Path(cache_dir)
    removed = 0
    if folder.is_dir():
        for child in folder.iterdir():
            pid = temporary_owner(child.name)
            if (pid is not None and child.is_dir() and not process_alive(pid)
                    and child.name in _temporary_names(cases, pid)):
                shutil.rmtree(child)
                removed += 1
    return removed


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CaseWriter:
    """Append a case's arrays batch by batch into a temporary folder, then publish it with one rename.

    Each .npy gets its header for the final shape first, then every batch is appended as one
    large sequential write (plain writes, not memory maps, so the written pages never count
    in the process's memory and nothing is held beyond the batch).
    """

    def __init__(self, cache_dir: Path, case: str, arrays: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self.final = Path(cache_dir) / case
        self.tmp = temporary_case_dir(Path(cache_dir), case)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.files, self.layout, self.missing = {}, {}, {}
        try:
            for name, (shape, dtype) in arrays.items():
                dtype = np.dtype(dtype)
                handle = open(self.tmp / f"{name}.npy", "wb")
                self.files[name] = handle
                with naming(self.final):
                    np.lib.format.write_array_header_1_0(handle, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                                  "fortran_order": False, "shape": tuple(shape)})
                self.layout[name] = (tuple(shape[1:]), dtype)
                self.missing[name] = shape[0]
        except BaseException:  # e.g. a full disk: no `with` block runs __exit__ for a failed constructor
            self.discard()
            raise

    def append(self, batch: dict[str, np.ndarray]) -> None:
        """Append the next slices of every array named in `batch` (in slice order)."""
        for name, values in batch.items():
            row_shape, dtype = self.layout[name]
            values = np.ascontiguousarray(values, dtype=dtype)
            if values.shape[1:] != row_shape or len(values) > self.missing[name]:
                raise ValueError(f"{name}: batch of shape {values.shape} does not fit the remaining "
                                 f"({self.missing[name]}, *{row_shape})")
            with naming(self.final):  # a full disk names the case folder
                self.files[name].write(values.data)
            self.missing[name] -= len(values)

    def commit(self, meta: dict) -> int:
        """fsync the arrays, write meta.json last, rename into place; return the bytes on disk."""
        unfilled = [name for name, count in self.missing.items() if count]
        if unfilled:
            raise ValueError(f"{self.final.name}: arrays not filled: {', '.join(unfilled)}")
        for handle in self.files.values():
            with naming(self.final):
                handle.flush()
                os.fsync(handle.fileno())
            handle.close()
        self.files.clear()
        sizes = {path.name: path.stat().st_size for path in sorted(self.tmp.glob("*.npy"))}
        write_json({**meta, "files": sizes}, self.tmp / META)
        _fsync(self.tmp / META)
        _fsync(self.tmp)
        with file_lock(self.final.parent / _LOCK):  # a concurrent run may publish the same case
            if self.final.exists():
                replaced = temporary_case_dir(self.final.parent, self.final.name + REPLACED_SUFFIX)
                os.replace(self.final, replaced)
                os.replace(self.tmp, self.final)
                shutil.rmtree(replaced)
            else:
                os.replace(self.tmp, self.final)
            # inside the lock: a concurrent run publishing the same case may replace this folder right after
            size = sum(path.stat().st_size for path in self.final.iterdir())
        _fsync(self.final.parent)
        return size

    def discard(self) -> None:
        for handle in self.files.values():
            handle.close()
        self.files.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "CaseWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():
            self.discard()


def update_manifest(cache_dir: str | os.PathLike, plan: dict, plan_hash: str) -> dict:
    """Rewrite manifest.json from the complete case folders made with this plan (all parts' cases)."""
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / _LOCK):  # parts of a sharded run merge in turn
        cases = {}
        for case in complete_cases(folder, plan_hash):
            meta = read_json(folder / case / META)
            cases[case] = {"domain": meta["domain"], "slices": len(meta["z"])}
        manifest = {
            "plans_name": plan["plans_name"], "encoder": plan["encoder"], "family": plan["family"],
            "checkpoint_sha256": plan["checkpoint_sha256"], "tap_blocks": plan["tap_blocks"],
            "tap_shapes": plan["tap_shapes"], "neck_shape": plan["neck_shape"], "dtype": plan["cache_dtype"],
            "plan_sha256": plan_hash,
            "cases": cases,
        }
        write_json(manifest, folder / MANIFEST)
    return manifest
