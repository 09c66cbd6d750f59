"""Augmented views: batchgenerators' intensity transforms or SLAug's location-scale curves on the uint8 slices,
cached per view for the source cases, seeded per case, drawn by the trainer's dataset; a cache without views
trains as before."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from desam_pipeline.data import cache, raw_dataset, slice_data
from desam_pipeline.data.augmented_views import SCALE_RANGE, make_views, plan_entry, view_kind, view_labels, views_for
from desam_pipeline.data.plan_io import DEFAULT_CHOICES, REQUIRED_KEYS, plan_hash, plan_problems
from desam_pipeline.data.preprocessing import preprocess_label, preprocess_volume
from desam_pipeline.training import train
from desam_pipeline.utilities.errors import DesamError
from plans.plan_and_embed import plan_and_embed, prepare_case

from toy_data import TINY_FRAME, toy_volume, write_toy_dataset


DATASET = "Dataset900_Toy"
PLANS = "DeSAMPlans_tiny"
VIEWS = 2


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_checkpoint) -> Path:
    """Toy dataset, SiteA embedded with 2 augmented views, SiteB (unseen) embedded by a second call."""
    root = tmp_path_factory.mktemp("views")
    write_toy_dataset(root / "raw", shape=(40, 36, 6))
    common = dict(encoder="tiny", checkpoint=str(tiny_checkpoint), slices="foreground", device="cpu",
                  raw=str(root / "raw"), preprocessed=str(root / "pre"))
    plan_and_embed("900", domains=["SiteA"], augmented_views=VIEWS, **common)
    plan_and_embed("900", domains=["SiteB"], **common)
    return root


def case_dir(root: Path, case: str) -> Path:
    return root / "pre" / DATASET / PLANS / case


def test_views_change_intensities_but_keep_the_structure_and_are_seeded():
    image, label = toy_volume(np.random.default_rng(3), (64, 60, 6), empty_slices=1)
    slices = preprocess_volume(image, dict(DEFAULT_CHOICES))
    target = preprocess_label(label) > 0
    views = make_views(slices, 3, "SiteA_Case00")
    assert views.shape == (3, *slices.shape) and views.dtype == np.uint8
    for view in views:
        assert np.mean(view != slices) > 0.2  # every view differs from the original
        assert np.all(view[slices == 0] == 0)  # padding stays padding
        for s in np.flatnonzero(target.any(axis=(1, 2))):  # the labelled blob is still the bright region
            assert view[s][target[s]].mean() > view[s][~target[s] & (slices[s] > 0)].mean() + 20
    assert not np.array_equal(views[0], views[1])
    np.testing.assert_array_equal(views, make_views(slices, 3, "SiteA_Case00"))
    assert not np.array_equal(views, make_views(slices, 3, "SiteA_Case01"))
    state = np.random.get_state()[1].copy()
    make_views(slices, 1, "x")
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # the global generator is left alone


def location_scale_case() -> tuple[np.ndarray, np.ndarray]:
    """Toy slices whose blob (label 1) is brighter than the rest of the body on every labelled slice."""
    image, label = toy_volume(np.random.default_rng(5), (64, 60, 6), empty_slices=1)
    return preprocess_volume(image, dict(DEFAULT_CHOICES)), preprocess_label(label)


def test_location_scale_global_views_keep_each_slices_order_and_local_views_can_invert_a_structure():
    slices, labels = location_scale_case()
    views = make_views(slices, 8, "SiteA_Case00", kind="location_scale", labels=labels)
    assert views.shape == (8, *slices.shape) and views.dtype == np.uint8
    np.testing.assert_array_equal(views, make_views(slices, 8, "SiteA_Case00", kind="location_scale", labels=labels))
    assert not np.array_equal(views, make_views(slices, 8, "SiteA_Case01", kind="location_scale", labels=labels))
    flipped = kept = 0
    for k, view in enumerate(views, start=1):
        assert np.all(view[slices == 0] == 0) and np.mean(view != slices) > 0.2
        for s in range(len(slices)):
            body = slices[s] > 0
            order = np.argsort(slices[s][body], kind="stable")
            steps = np.diff(view[s][body][order].astype(int))
            if k % 2:  # global: one increasing curve and a positive scale per slice keep the tissues' order
                assert steps.min() >= 0
            elif labels[s].any():  # local: the structure gets its own curve and shift
                inside, outside = view[s][labels[s] > 0].mean(), view[s][body & (labels[s] == 0)].mean()
                flipped += inside < outside
                kept += inside > outside
    assert flipped and kept  # some local views turn the bright blob darker than its surroundings, some not
    with pytest.raises(ValueError, match="need the labels"):
        make_views(slices, 1, "SiteA_Case00", kind="location_scale")


def test_the_plan_records_the_view_kind_only_when_it_is_not_the_default():
    nnunet = plan_entry(2, ["SiteA"], None)
    assert "kind" not in nnunet and view_kind({"augmented_views": nnunet}) == "nnunet"
    location = plan_entry(2, ["SiteA"], None, "location_scale")
    assert location["kind"] == "location_scale" and view_kind({"augmented_views": location}) == "location_scale"
    assert location["transforms"] != nnunet["transforms"]
    assert plan_hash({"augmented_views": location}) != plan_hash({"augmented_views": nnunet})
    assert plan_entry(None, None, {"augmented_views": location}) == location
    with pytest.raises(DesamError, match="--view-kind needs --augmented-views"):
        plan_entry(None, None, None, "location_scale")
    with pytest.raises(DesamError, match="unknown --view-kind 'swap'"):
        plan_entry(2, None, None, "swap")
    assert any(problem.startswith("augmented_views must be") for problem in
               plan_problems({**bare_plan(), "augmented_views": {**location, "kind": "swap"}}))
    assert not any(problem.startswith("augmented_views") for problem in
                   plan_problems({**bare_plan(), "augmented_views": location}))


def test_scale_views_zoom_image_and_label_together_about_the_centre():
    slices, labels = location_scale_case()
    views = make_views(slices, 6, "SiteA_Case00", kind="scale")
    moved = view_labels(labels, 6, "SiteA_Case00", kind="scale")
    assert views.shape == moved.shape == (6, *slices.shape) and moved.dtype == np.uint8
    np.testing.assert_array_equal(views, make_views(slices, 6, "SiteA_Case00", kind="scale"))
    np.testing.assert_array_equal(moved, view_labels(labels, 6, "SiteA_Case00", kind="scale"))
    assert not np.array_equal(views, make_views(slices, 6, "SiteA_Case01", kind="scale"))
    assert view_labels(labels, 6, "SiteA_Case00", kind="nnunet") is None  # intensity views share the label
    centre = (np.array(slices.shape[1:]) - 1) / 2
    ratios = []
    for view, label in zip(views, moved):
        for s in np.flatnonzero(labels.any(axis=(1, 2))):
            if not label[s].any():
                continue
            # the moved label still marks the bright blob of the moved image
            assert view[s][label[s] > 0].mean() > view[s][(label[s] == 0) & (view[s] > 0)].mean() + 20
            # areas scale with the square of one zoom factor, about the slice's centre
            ratio = np.sqrt(label[s].astype(bool).sum() / labels[s].astype(bool).sum())
            before, after = np.argwhere(labels[s]).mean(axis=0) - centre, np.argwhere(label[s]).mean(axis=0) - centre
            np.testing.assert_allclose(after, before * ratio, atol=1.5)
            ratios.append(ratio)
    assert SCALE_RANGE[0] - 0.1 < min(ratios) < 0.95 and 1.05 < max(ratios) < SCALE_RANGE[1] + 0.1


def bare_plan() -> dict:
    """A plan with every required key present (values are not checked by these tests)."""
    return {key: None for key in REQUIRED_KEYS}


@pytest.mark.slow
def test_views_are_cached_for_the_source_cases_only(cached):
    plan = json.loads((cached / "pre" / DATASET / f"{PLANS}.json").read_text(encoding="utf-8"))
    assert plan["augmented_views"]["count"] == VIEWS and plan["augmented_views"]["sites"] == ["SiteA"]
    assert views_for(plan, "SiteA") == VIEWS and views_for(plan, "SiteB") == 0
    source, unseen = case_dir(cached, "SiteA_Case00"), case_dir(cached, "SiteB_Case00")
    assert json.loads((source / "meta.json").read_text(encoding="utf-8"))["views"] == VIEWS
    assert "views" not in json.loads((unseen / "meta.json").read_text(encoding="utf-8"))
    assert not list(unseen.glob("view*"))
    original = cache.open_case(source)
    for v in range(1, VIEWS + 1):
        for name in ("image", "neck", "tap0", "tap1", "tap2"):
            view = original[cache.view_array(name, v)]
            assert view.shape == original[name].shape and view.dtype == original[name].dtype
            assert not np.array_equal(view, original[name])
        # the cached view is the seeded view of the cached original slices
        np.testing.assert_array_equal(original[cache.view_array("image", v)],
                                      make_views(np.asarray(original["image"]), VIEWS, "SiteA_Case00")[v - 1])


@pytest.mark.slow
def test_the_training_stream_draws_views_and_validation_does_not(cached):
    source = case_dir(cached, "SiteA_Case00")
    train_data = slice_data.SliceDataset([source], "box", seed=0, stream=slice_data.TRAIN_STREAM, sampling="slices",
                                         frame=TINY_FRAME, hard_negatives=0.0)
    drawn = []
    for epoch in range(12):
        for index in range(len(train_data)):
            sample = train_data[(epoch, index)]
            view, s = int(sample["view"]), train_data.entries[index][1]
            np.testing.assert_array_equal(sample["neck"], np.load(source / f"{cache.view_array('neck', view)}.npy")[s])
            drawn.append(view)
    assert set(drawn) == set(range(VIEWS + 1))
    assert [int(train_data[(3, 1)]["view"]) for _ in range(3)] == [drawn[3 * len(train_data) + 1]] * 3
    val_data = slice_data.SliceDataset([source], "box", seed=0, stream=slice_data.VAL_STREAM, sampling="slices",
                                       frame=TINY_FRAME, hard_negatives=0.0)
    assert {int(val_data[(e, i)]["view"]) for e in range(5) for i in range(len(val_data))} == {0}
    plain = slice_data.SliceDataset([case_dir(cached, "SiteB_Case00")], "box", seed=0, sampling="slices",
                                    frame=TINY_FRAME, hard_negatives=0.0)
    assert {int(plain[(e, 0)]["view"]) for e in range(10)} == {0}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["SiteA", "SiteB"])  # with views, and a cache without views
def test_training_runs_with_and_without_views(cached, source):
    with pytest.raises(SystemExit) as stop:
        train.main(["900", "all", "--source", source, "--mode", "box", "--epochs", "1", "--batch-size", "2",
                    "--device", "cpu", "--num-workers", "0", "--plans-name", PLANS,
                    "--preprocessed", str(cached / "pre"), "--results", str(cached / f"results_{source}")])
    assert stop.value.code == 0
    model = cached / f"results_{source}" / DATASET / f"DeSAMTrainer__{PLANS}__box__src-{source}"
    assert (model / "fold_all" / "checkpoint_final.pth").is_file()


@pytest.mark.slow
def test_no_augmented_views_trains_on_the_originals_of_a_cache_with_views(cached):
    source = case_dir(cached, "SiteA_Case00")
    ignoring = slice_data.SliceDataset([source], "box", seed=0, stream=slice_data.TRAIN_STREAM, sampling="slices",
                                       frame=TINY_FRAME, hard_negatives=0.0,
                                     use_views=False)
    for epoch in range(8):
        for index in range(len(ignoring)):
            sample = ignoring[(epoch, index)]
            assert int(sample["view"]) == 0
            np.testing.assert_array_equal(sample["neck"], np.load(source / "neck.npy")[ignoring.entries[index][1]])
    with pytest.raises(SystemExit) as stop:
        train.main(["900", "all", "--source", "SiteA", "--mode", "box", "--epochs", "1", "--batch-size", "2",
                    "--device", "cpu", "--num-workers", "0", "--plans-name", PLANS, "--no-augmented-views",
                    "--preprocessed", str(cached / "pre"), "--results", str(cached / "results_no_views")])
    assert stop.value.code == 0
    fold = cached / "results_no_views" / DATASET / f"DeSAMTrainer__{PLANS}__box__src-SiteA" / "fold_all"
    assert json.loads((fold / "debug.json").read_text(encoding="utf-8"))["augmented_views"] is False
    # resuming with views would be another run: refused, not mixed
    with pytest.raises(SystemExit) as stop:
        train.main(["900", "all", "--source", "SiteA", "--mode", "box", "--epochs", "1", "--batch-size", "2",
                    "--device", "cpu", "--num-workers", "0", "--plans-name", PLANS, "-c",
                    "--preprocessed", str(cached / "pre"), "--results", str(cached / "results_no_views")])
    assert stop.value.code == 1


@pytest.mark.slow
def test_embedding_makes_location_scale_views_from_the_cases_labels(cached):
    plan = json.loads((cached / "pre" / DATASET / f"{PLANS}.json").read_text(encoding="utf-8"))
    plan["augmented_views"] = plan_entry(VIEWS, ["SiteA"], None, "location_scale")
    raw_dir = cached / "raw" / DATASET
    prepared = prepare_case(raw_dir, raw_dataset.load_dataset_json(raw_dir), "SiteA_Case00", "x", plan, "y")
    assert prepared["label"].any()
    np.testing.assert_array_equal(prepared["views"], make_views(prepared["image"], VIEWS, "SiteA_Case00",
                                                                kind="location_scale", labels=prepared["label"]))


@pytest.mark.slow
def test_scale_views_cache_their_own_labels_and_training_reads_them(tmp_path, tiny_checkpoint):
    write_toy_dataset(tmp_path / "raw", sites=("SiteA",), cases_per_site=1, shape=(40, 36, 6), empty_slices=1)
    plan_and_embed("900", encoder="tiny", checkpoint=str(tiny_checkpoint), slices="all", device="cpu",
                   raw=str(tmp_path / "raw"), preprocessed=str(tmp_path / "pre"), domains=["SiteA"],
                   augmented_views=VIEWS, view_kind="scale")
    source = case_dir(tmp_path, "SiteA_Case00")
    meta = json.loads((source / "meta.json").read_text(encoding="utf-8"))
    assert meta["views"] == VIEWS and meta["view_labels"] is True
    original = cache.open_case(source)
    expected = view_labels(np.asarray(original["label"]), VIEWS, "SiteA_Case00", kind="scale")
    views = make_views(np.asarray(original["image"]), VIEWS, "SiteA_Case00", kind="scale")
    for v in range(1, VIEWS + 1):
        np.testing.assert_array_equal(original[cache.view_array("label", v)], expected[v - 1])
        np.testing.assert_array_equal(original[cache.view_array("image", v)], views[v - 1])
    data = slice_data.SliceDataset([source], "grid", seed=0, stream=slice_data.TRAIN_STREAM, sampling="balanced",
                                   frame=TINY_FRAME, hard_negatives=0.5)
    assert not np.array_equal(data.footprints[0][0][0], data.footprints[0][0][1])  # each view's own footprint
    drawn = set()
    for epoch in range(6):
        for index in range(len(data)):
            sample = data[(epoch, index)]
            view, s = int(sample["view"]), data._draw(epoch, index)[0][2]
            np.testing.assert_array_equal(sample["label"], original[cache.view_array("label", view)][s])
            np.testing.assert_array_equal(sample["neck"], original[cache.view_array("neck", view)][s])
            drawn.add(view)
    assert drawn == set(range(VIEWS + 1))
