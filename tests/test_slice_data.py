"""Slice dataset and loader: one slice read at a time, keyed prompts, DDP-ready sampling, no hangs."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from desam_pipeline.data import cache, slice_data
from desam_pipeline.data.prompts import whole_box
from desam_pipeline.utilities.errors import DesamError

from toy_data import TINY_FRAME

SCALE = TINY_FRAME / 256

WIDTH = 8
SLICES = {"A_00": 3, "A_01": 4, "B_00": 2}


def write_case(cache_dir: Path, case: str, slices: int, rng: np.random.Generator) -> dict:
    """A synthetic case in the cache layout; returns its arrays for comparison."""
    label = np.zeros((slices, 256, 256), np.uint8)
    for s in range(slices):
        label[s, 40 + 10 * s:120, 60:150 + 5 * s] = 1
    arrays = {"image": label * 200, "label": label,
              "neck": rng.standard_normal((slices, 256, 64, 64)).astype(np.float16),
              **{f"tap{i}": rng.standard_normal((slices, WIDTH, 64, 64)).astype(np.float16) for i in range(3)}}
    with cache.CaseWriter(cache_dir, case, {k: (v.shape, v.dtype) for k, v in arrays.items()}) as writer:
        writer.append(arrays)
        writer.commit({"case": case, "domain": case[0], "z": list(range(slices)), "shape": [256, 256, slices],
                       "spacing": [1.0, 1.0, 1.0], "affine": np.eye(4).tolist(), "input_sha256": "",
                       "plan_sha256": ""})
    return arrays


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    rng = np.random.default_rng(0)
    arrays = {case: write_case(folder, case, count, rng) for case, count in SLICES.items()}
    return folder, arrays


def dataset(synthetic_cache, mode="grid", seed=3):
    folder, _ = synthetic_cache
    return slice_data.SliceDataset([folder / case for case in SLICES], mode, seed, sampling="slices",
                                   frame=TINY_FRAME, hard_negatives=0.0)


def test_items_are_the_cached_slices(synthetic_cache):
    data = dataset(synthetic_cache)
    _, arrays = synthetic_cache
    assert len(data) == sum(SLICES.values())
    assert data.entries == [(c, s) for c, count in enumerate(SLICES.values()) for s in range(count)]
    item = data[(0, 4)]  # A_01 slice 1
    for name in ("neck", "tap0", "tap1", "tap2", "label"):
        np.testing.assert_array_equal(item[name], arrays["A_01"][name][1])
    assert item["neck"].dtype == np.float16 and not isinstance(item["neck"], np.memmap)


def test_reading_keeps_no_mapping_open(synthetic_cache):
    folder, _ = synthetic_cache
    data = dataset(synthetic_cache)
    for index in range(len(data)):
        data[(0, index)]
    maps = Path("/proc/self/maps").read_text(encoding="utf-8")
    assert str(folder) not in maps


def test_grid_prompts_are_keyed_by_epoch_and_slice(synthetic_cache):
    data = dataset(synthetic_cache)
    again = dataset(synthetic_cache)
    hits = 0
    for index in range(len(data)):
        first = data[(0, index)]
        np.testing.assert_array_equal(first["coords"], again[(0, index)]["coords"])
        x, y = first["coords"][0]
        row, col = int(y / SCALE), int(x / SCALE)
        assert first["iou_target"] == float(first["label"][row, col] > 0)  # IoU target = point on the object
        assert first["point_labels"].tolist() == [1]
        hits += first["iou_target"]
    assert 0 < hits < len(data)  # both foreground and background clicks occur
    changed = [not np.array_equal(data[(0, i)]["coords"], data[(1, i)]["coords"]) for i in range(len(data))]
    assert all(changed)
    other_seed = dataset(synthetic_cache, seed=4)
    assert any(not np.array_equal(data[(0, i)]["coords"], other_seed[(0, i)]["coords"]) for i in range(len(data)))


def test_box_mode_gives_the_whole_image_box(synthetic_cache):
    item = dataset(synthetic_cache, mode="box")[(0, 0)]
    np.testing.assert_array_equal(item["box"], whole_box(1, TINY_FRAME)[0])
    assert "coords" not in item


def batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(slice_data.loader_batches(loader))


@pytest.mark.timeout(120)
def test_workers_give_the_same_batches_as_the_main_process(synthetic_cache):
    data = dataset(synthetic_cache)
    inline = slice_data.make_loader(data, slice_data.train_sampler(data, seed=5), 2, num_workers=0)
    workers = slice_data.make_loader(data, slice_data.train_sampler(data, seed=5), 2, num_workers=2,
                                     timeout_s=60)
    for epoch in (0, 1):
        a, b = batches(inline, epoch), batches(workers, epoch)
        assert len(a) == len(b) == 5
        for x, y in zip(a, b):
            for key in x:
                assert torch.equal(x[key], y[key]), key
    orders = [torch.cat([b["index"] for b in batches(inline, e)]).tolist() for e in (0, 1)]
    assert sorted(orders[0]) == list(range(len(data))) and orders[0] != orders[1]  # reshuffled per epoch


def test_ranks_together_draw_the_single_process_global_batches(synthetic_cache):
    """Rank r's t-th batch of size B/W, over all ranks, is exactly the t-th global batch of one process."""
    folder, _ = synthetic_cache
    data = slice_data.SliceDataset([folder / "A_00", folder / "A_01"], "grid", 1,
                                   sampling="slices", frame=TINY_FRAME,
                                   hard_negatives=0.0)  # 7 slices -> 8 with padding
    world, global_batch = 2, 4

    def run(world_size, rank, batch):
        loader = slice_data.make_loader(data, slice_data.train_sampler(data, 9, world_size, rank), batch, 0)
        return batches(loader, 2)

    single = run(1, 0, global_batch)
    ranks = [run(world, r, global_batch // world) for r in range(world)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 2
    for t, whole in enumerate(single[:-1]):  # the last single batch has 3 slices, the ranks' one a padded 4
        parts = [ranks[r][t] for r in range(world)]
        merged = torch.cat([p["index"] for p in parts])
        assert sorted(merged.tolist()) == sorted(whole["index"].tolist())
        order = {int(i): k for k, i in enumerate(whole["index"])}
        for p in parts:
            for k, i in enumerate(p["index"].tolist()):
                assert torch.equal(p["coords"][k], whole["coords"][order[i]])  # same prompt for the same slice


def test_validation_shards_cover_every_slice_once(synthetic_cache):
    data = dataset(synthetic_cache)
    seen = [i for r in range(2) for _, i in slice_data.val_sampler(data, 2, r)]
    assert sorted(seen) == list(range(len(data)))


class DyingDataset(slice_data.SliceDataset):
    def __getitem__(self, key):
        os._exit(3)


class StallingDataset(slice_data.SliceDataset):
    def __getitem__(self, key):
        time.sleep(600)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind, message", [(DyingDataset, "exited unexpectedly"), (StallingDataset, "timed out")])
def test_a_dead_or_stalled_worker_is_an_error_not_a_hang(synthetic_cache, kind, message):
    folder, _ = synthetic_cache
    data = kind([folder / "A_00"], "grid", 0, sampling="slices", frame=TINY_FRAME, hard_negatives=0.0)
    loader = slice_data.make_loader(data, slice_data.train_sampler(data, 0), 1, num_workers=1, timeout_s=5)
    start = time.perf_counter()
    with pytest.raises(DesamError, match=f"data loader failed: .*{message}.*--num-workers 0"):
        batches(loader, 0)
    assert time.perf_counter() - start < 60


def test_train_slices_picks_the_cached_slices_a_default_plan_would_cache(tmp_path):
    """A cache of every slice (z 0..11, foreground on 5..7) trains on foreground_margin = z 3..9 and
    foreground = z 5..7, by the embedding's own rule; `all` keeps every cached slice; an unknown rule fails."""
    depth, rng = 12, np.random.default_rng(1)
    label = np.zeros((depth, 256, 256), np.uint8)
    label[5:8, 100:140, 100:140] = 1
    arrays = {"image": label * 200, "label": label,
              "neck": rng.standard_normal((depth, 256, 64, 64)).astype(np.float16),
              **{f"tap{i}": rng.standard_normal((depth, WIDTH, 64, 64)).astype(np.float16) for i in range(3)}}
    z = list(range(100, 100 + depth))  # cache positions differ from slice indices
    with cache.CaseWriter(tmp_path, "C_00", {k: (v.shape, v.dtype) for k, v in arrays.items()}) as writer:
        writer.append(arrays)
        writer.commit({"case": "C_00", "domain": "C", "z": z, "shape": [256, 256, 200], "spacing": [1.0] * 3,
                       "affine": np.eye(4).tolist(), "input_sha256": "", "plan_sha256": ""})
    chosen = {rule: slice_data.SliceDataset([tmp_path / "C_00"], "grid", 0, sampling="slices", frame=TINY_FRAME,
                                            hard_negatives=0.0, slices=rule)
              for rule in ("all", "foreground_margin", "foreground")}
    assert [s for _, s in chosen["all"].entries] == list(range(depth))
    assert [s for _, s in chosen["foreground_margin"].entries] == list(range(3, 10))
    assert [s for _, s in chosen["foreground"].entries] == [5, 6, 7]
    item = chosen["foreground"][(0, 0)]  # the first foreground slice, read from cache position 5
    np.testing.assert_array_equal(item["neck"], arrays["neck"][5])
    assert item["label"].any()
    with pytest.raises(DesamError, match="unknown slice selection"):
        slice_data.SliceDataset([tmp_path / "C_00"], "grid", 0, sampling="slices", frame=TINY_FRAME,
                                hard_negatives=0.0, slices="middle")


@pytest.fixture(scope="module")
def cache_with_empty_slices(tmp_path_factory):
    """Two cases whose first and last slices hold no object (as a volume's ends do)."""
    folder = tmp_path_factory.mktemp("cache_empty")
    rng = np.random.default_rng(1)
    for case, slices in (("A_00", 5), ("A_01", 6)):
        arrays = write_case(folder, case, slices, rng)
        arrays["label"][[0, -1]] = 0
        np.save(folder / case / "label.npy", arrays["label"])
    return folder


def test_balanced_sampling_draws_clicks_on_and_off_the_object_one_to_one(cache_with_empty_slices):
    cases = [cache_with_empty_slices / c for c in ("A_00", "A_01")]
    data = slice_data.SliceDataset(cases, "grid", 0, frame=TINY_FRAME, hard_negatives=0.0, sampling="balanced")
    positives = (5 - 2) + (6 - 2)
    assert len(data) == 2 * positives
    targets = [float(data[(epoch, i)]["iou_target"]) for epoch in range(3) for i in range(len(data))]
    assert targets.count(1.0) == targets.count(0.0) == 3 * positives
    empty_labels = sum(not data[(epoch, i)]["label"].any() for epoch in range(3) for i in range(positives, len(data)))
    assert empty_labels > 0  # background clicks also land on the empty end slices
    assert all(data[(0, i)]["label"].any() for i in range(positives))


def test_slices_sampling_gives_mostly_background_targets_when_many_slices_are_empty(cache_with_empty_slices):
    """The bias the balanced sampler removes: an empty slice can only give a click off the object."""
    cases = [cache_with_empty_slices / c for c in ("A_00", "A_01")]
    data = slice_data.SliceDataset(cases, "grid", 0, frame=TINY_FRAME, hard_negatives=0.0, sampling="slices")
    assert len(data) == 11
    targets = [float(data[(epoch, i)]["iou_target"]) for epoch in range(20) for i in range(len(data))]
    assert np.mean(targets) < 0.45


def test_balanced_draws_are_keyed_by_epoch_and_index(cache_with_empty_slices):
    cases = [cache_with_empty_slices / c for c in ("A_00", "A_01")]
    first = slice_data.SliceDataset(cases, "grid", 0, frame=TINY_FRAME, hard_negatives=0.0, sampling="balanced")
    second = slice_data.SliceDataset(cases, "grid", 0, frame=TINY_FRAME, hard_negatives=0.0, sampling="balanced")
    for key in ((0, 9), (2, 12), (1, 3)):
        np.testing.assert_array_equal(first[key]["coords"], second[key]["coords"])
        np.testing.assert_array_equal(first[key]["label"], second[key]["label"])


def test_box_mode_ignores_balanced_sampling(cache_with_empty_slices):
    cases = [cache_with_empty_slices / c for c in ("A_00", "A_01")]
    data = slice_data.SliceDataset(cases, "box", 0, frame=TINY_FRAME, hard_negatives=0.0, sampling="balanced")
    assert len(data) == 11


def test_unknown_sampling_is_refused(cache_with_empty_slices):
    with pytest.raises(DesamError, match="unknown sampling"):
        slice_data.SliceDataset([cache_with_empty_slices / "A_00"], "grid", 0, frame=TINY_FRAME, hard_negatives=0.0,
                                sampling="fair")


def test_hard_negative_clicks_fall_where_the_case_holds_the_object(cache_with_empty_slices):
    """hard_negatives=1: every click off the object lies inside the case's footprint (where any of its slices holds
    the object), on the empty end slices too; 0: the whole background, mostly outside it."""
    cases = [cache_with_empty_slices / c for c in ("A_00", "A_01")]
    footprints = [np.load(c / "label.npy").any(axis=0) for c in cases]

    def inside_share(hard: float) -> tuple[float, int]:
        inside, empty = [], 0
        for case, footprint in zip(cases, footprints):  # one case per dataset: every click is that case's
            data = slice_data.SliceDataset([case], "grid", 0, frame=TINY_FRAME, hard_negatives=hard,
                                           sampling="balanced")
            for epoch in range(4):
                for i in range(len(data.positives), len(data)):
                    sample = data[(epoch, i)]
                    col, row = (sample["coords"][0] * 256 / TINY_FRAME).astype(int)
                    inside.append(footprint[row, col])
                    assert sample["iou_target"] == 0 and sample["label"][row, col] == 0
                    empty += not sample["label"].any()
        return float(np.mean(inside)), empty

    hard, empty = inside_share(1.0)
    assert hard == 1.0 and empty > 0
    assert inside_share(0.0)[0] < 0.9
