"""Several structures and CT windowing: per-structure labels, training targets, merged predictions and
per-structure evaluation on tiny fixtures; binary datasets and plans without the new fields unchanged."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from desam_pipeline.data.plan_io import DEFAULT_CHOICES, plan_problems
from desam_pipeline.data.preprocessing import (intensity_to_uint8, preprocess_label, preprocess_volume,
                                               volume_to_uint8, window_to_uint8)
from desam_pipeline.data.raw_dataset import label_classes, modality_of_site
from desam_pipeline.data.slice_data import cached_positions, label_summary, structure_target
from desam_pipeline.inference.class_merge import merge_structures
from desam_pipeline.io.results_layout import class_folder, class_folders
from desam_pipeline.data.plan_io import check_structure
from desam_pipeline.utilities.errors import DesamError
from evaluation.class_tables import mean_over_structures, structure_table
from plans.fingerprint import FOREGROUND_SAMPLES, foreground_sample, intensity_windows, modality_windows

LABELS = {"background": 0, "liver": 1, "spleen": 2}


def binary_fixture():
    rng = np.random.default_rng(7)
    volume = rng.normal(300, 80, (48, 40, 6)).astype(np.float32)
    volume[:3] = 0
    label = np.zeros((48, 40, 6), np.uint8)
    label[14:30, 12:26, 1:5] = 1
    return volume, label


def test_binary_preprocessing_is_unchanged_bit_for_bit():
    """sha256 of the slices main's code made from this fixture before windows and classes existed."""
    volume, label = binary_fixture()
    plan = dict(DEFAULT_CHOICES)
    assert hashlib.sha256(preprocess_volume(volume, plan).tobytes()).hexdigest() == \
        "4c92f95bbef7c9b764a1eb799dbada1cfcf8eb88e6800e02098cde82af400f61"
    assert hashlib.sha256(preprocess_label(label, plan).tobytes()).hexdigest() == \
        "403924dbc25d0152039c837e9048156374d947637d8edd60d8a60efe1499ffec"
    # a modality without a window (MR, or a CT plan's MR cases) scales exactly as before
    windowed = plan | {"intensity": {**plan["intensity"], "windows": {"CT": [-100.0, 200.0]}}}
    assert np.array_equal(preprocess_volume(volume, windowed, modality="MR"), preprocess_volume(volume, plan))
    assert np.array_equal(preprocess_volume(volume, windowed, modality=None), preprocess_volume(volume, plan))


def test_ct_window_keeps_water_and_clips_to_the_plan_window():
    hu = np.array([[[-1000.0, -100.0, 0.0, 50.0, 200.0, 1500.0]]], np.float32)
    out = window_to_uint8(hu, -100.0, 200.0)
    assert out.ravel().tolist() == [0, 0, 85, 128, 255, 255]  # 0 HU is water (85), not background
    intensity = {"low_percentile": 0.5, "high_percentile": 99.5, "windows": {"CT": [-100.0, 200.0]}}
    assert np.array_equal(volume_to_uint8(hu, intensity, "CT"), out)
    assert volume_to_uint8(hu, intensity, "CT")[0, 0, 2] != intensity_to_uint8(hu)[0, 0, 2] == 0
    # the window is fixed: a case's own intensity range does not move it
    assert np.array_equal(volume_to_uint8(hu[..., :4], intensity, "CT"), out[..., :4])


def test_fingerprint_window_from_pooled_foreground_percentiles():
    rng = np.random.default_rng(0)
    images = [rng.uniform(-1000, 1000, (30, 30, 30)).astype(np.float32) for _ in range(2)]
    labels = [np.zeros((30, 30, 30), np.uint8) for _ in range(2)]
    for image, label in zip(images, labels):
        label[2:28, 2:28, 2:28] = 1
        image[label > 0] = rng.uniform(40, 200, int(label.sum()))
    samples = [foreground_sample(i, m, f"case{k}") for k, (i, m) in enumerate(zip(images, labels))]
    assert all(len(s) == FOREGROUND_SAMPLES for s in samples)
    assert np.array_equal(samples[0], foreground_sample(images[0], labels[0], "case0"))  # seeded
    windows = modality_windows({"CT": samples, "MR": samples})
    assert set(windows) == {"CT"} and windows["CT"]["cases"] == 2
    low, high = windows["CT"]["foreground_window"]
    assert 40 <= low < 42 and 198 < high <= 200
    assert intensity_windows({"modalities": windows}) == {"CT": [low, high]}
    assert intensity_windows({}) == {}


def test_plan_fields_checked():
    plan_fields = {"intensity": {"low_percentile": 0.5, "high_percentile": 99.5, "windows": {"CT": [10.0, 5.0]}}}
    from desam_pipeline.data.plan_io import FIELD_RULES
    assert not FIELD_RULES["intensity"][1](plan_fields["intensity"])
    assert FIELD_RULES["intensity"][1]({"low_percentile": 0.5, "high_percentile": 99.5, "windows": {"CT": [5, 10]}})
    assert FIELD_RULES["label_classes"][1]({"liver": 1, "spleen": 2})
    assert not FIELD_RULES["label_classes"][1]({"liver": 1})
    assert plan_problems([]) != []


def test_dataset_json_modalities_and_classes():
    dataset_json = {"channel_names": {"0": "CT"}, "labels": LABELS, "modalities": {"CT": "CT", "MR": "MR"}}
    assert modality_of_site(dataset_json, "MR") == "MR"
    assert modality_of_site({"channel_names": {"0": "CT"}}, "SiteA") == "CT"
    assert label_classes(dataset_json) == {"liver": 1, "spleen": 2}
    assert label_classes({"labels": {"background": 0, "prostate": 1}}) == {}


def test_labels_keep_classes_only_in_multi_structure_plans():
    label = np.zeros((20, 20, 3), np.uint8)
    label[2:8, 2:8] = 1
    label[10:18, 10:18] = 2
    plan = dict(DEFAULT_CHOICES)
    assert set(np.unique(preprocess_label(label, plan))) == {0, 1}
    classes = preprocess_label(label, plan | {"label_classes": {"liver": 1, "spleen": 2}})
    assert set(np.unique(classes)) == {0, 1, 2}
    assert np.array_equal(classes > 0, preprocess_label(label, plan) > 0)
    assert np.array_equal(structure_target(classes, 2), (classes == 2).astype(np.uint8))
    assert structure_target(classes, None) is classes


def test_cached_positions_follow_the_structure(tmp_path):
    labels = np.zeros((5, 4, 4), np.uint8)
    labels[1, 0, 0] = labels[1, 1, 1] = 1
    labels[3, 0, 0] = labels[3, 2, 1] = 2
    np.save(tmp_path / "label.npy", labels)
    z = [10, 11, 12, 13, 14]
    every, footprint = label_summary(tmp_path)
    second, footprint_2 = label_summary(tmp_path, 2)
    assert every == [False, True, False, True, False] and second == [False, False, False, True, False]
    assert sorted(zip(*np.nonzero(footprint))) == [(0, 0), (1, 1), (2, 1)]  # where any slice holds a structure
    assert sorted(zip(*np.nonzero(footprint_2))) == [(0, 0), (2, 1)]
    assert cached_positions(z, every, "foreground") == [1, 3]
    assert cached_positions(z, second, "foreground") == [3]
    assert cached_positions(z, second, "all") == list(range(5))


def test_merge_by_highest_probability_within_masks():
    p1 = np.array([0.9, 0.6, 0.2, 0.7, 0.3], np.float32)
    p2 = np.array([0.1, 0.8, 0.3, 0.6, 0.2], np.float32)
    m1, m2 = p1 > 0.5, p2 > 0.5
    m2[4] = True  # post-processing (hole filling) can hold a voxel under 0.5
    merged = merge_structures([p1, p2], [m1, m2], [3, 4])
    assert merged.tolist() == [3, 4, 0, 3, 4]
    assert merged.dtype == np.uint8


def test_class_folders_and_structure_checks(tmp_path):
    model = tmp_path / "DeSAMTrainer__P__grid__src-CT"
    assert class_folders(model) == {}
    for value in (4, 1):
        class_folder(model, value).mkdir(parents=True)
    (model / "label_x").mkdir()
    assert list(class_folders(model)) == [1, 4]
    assert class_folder(model, 4).name == "label_4"
    plan = {"label_classes": {"liver": 1, "spleen": 4}}
    check_structure(plan, 4, "P")
    with pytest.raises(DesamError, match="--label"):
        check_structure(plan, None, "P")
    with pytest.raises(DesamError, match="3 is none"):
        check_structure(plan, 3, "P")
    with pytest.raises(DesamError, match="one structure"):
        check_structure({}, 1, "P")
    check_structure({}, None, "P")


def test_mean_over_structures_and_structure_table():
    base = {"case": ["a", "b"], "site": ["MR", "MR"], "in_domain": [False, False], "folds": ["0", "0"]}
    liver = pd.DataFrame(base | {"dice": [0.8, 0.6], "hd95": [4.0, np.nan]})
    spleen = pd.DataFrame(base | {"dice": [0.6, 0.4], "hd95": [2.0, 3.0]})
    mean = mean_over_structures({"liver": liver, "spleen": spleen})
    assert mean["dice"].tolist() == pytest.approx([0.7, 0.5])
    assert mean["hd95"].iloc[0] == pytest.approx(3.0) and np.isnan(mean["hd95"].iloc[1])
    site = lambda d: pd.DataFrame({"site": ["MR", "overall"], "metric": ["dice", "dice"], "mean": d})  # noqa: E731
    table = structure_table({"liver": site([0.7, 0.7]), "spleen": site([0.5, 0.5])}).set_index("site")
    assert table.loc["MR", "mean"] == pytest.approx(0.6)
    assert list(table.columns) == ["liver", "spleen", "mean"]


# ---------------------------------------------------------------- end to end on a tiny two-modality dataset
def write_two_structure_dataset(raw_root: Path, cases: int = 2, shape=(40, 36, 6)) -> Path:
    """CT (HU, water 0, air -1000) and MR cases with two blobs: 1 liver (left), 2 spleen (right)."""
    rng = np.random.default_rng(1)
    folder = raw_root / "Dataset903_TwoOrgans"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir(parents=True)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    domains = {}
    for modality, (air, body, liver, spleen) in {"CT": (-1000, 0, 60, 160), "MR": (0, 300, 120, 700)}.items():
        for i in range(cases):
            dz = (z - 2.5) / 1.8
            left = ((x - 12 - rng.uniform(-2, 2)) / 6) ** 2 + ((y - 18) / 7) ** 2 + dz ** 2 <= 1
            right = ((x - 28 - rng.uniform(-2, 2)) / 5) ** 2 + ((y - 18) / 6) ** 2 + dz ** 2 <= 1
            label = np.where(left, 1, np.where(right, 2, 0)).astype(np.uint8)
            image = np.full(shape, float(body)) + 10 * rng.standard_normal(shape)
            image[label == 1] += liver
            image[label == 2] += spleen
            image[:2] = air
            case = f"{modality}_{i:04d}"
            affine = np.diag([1.2, 1.2, 4.0, 1.0])
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), str(folder / "labelsTr" / f"{case}.nii.gz"))
            domains[case] = modality
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": len(domains), "file_ending": ".nii.gz",
        "domains": domains, "modalities": {"CT": "CT", "MR": "MR"}}), encoding="utf-8")
    return folder


def run(main, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code in (0, None), f"{main.__module__} {argv} exited {info.value.code}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_structures_end_to_end(trees, tmp_path):
    from desam_pipeline.data import cache
    from desam_pipeline.inference import predict
    from desam_pipeline.training import train
    from evaluation import evaluate
    from plans import plan_and_embed

    write_two_structure_dataset(trees["raw"])
    run(plan_and_embed.main, ["-d", "903", "--encoder", "tiny"])
    preprocessed = trees["preprocessed"] / "Dataset903_TwoOrgans"
    plan = json.loads((preprocessed / "DeSAMPlans_tiny.json").read_text(encoding="utf-8"))
    assert plan["label_classes"] == {"liver": 1, "spleen": 2}
    low, high = plan["intensity"]["windows"]["CT"]
    assert 30 < low < high < 240  # the organs' HU, not air or the whole range
    ct = cache.open_case(preprocessed / "DeSAMPlans_tiny" / "CT_0000")
    assert set(np.unique(ct["label"])) == {0, 1, 2}
    volume = np.asarray(nib.load(trees["raw"] / "Dataset903_TwoOrgans" / "imagesTr" / "CT_0000_0000.nii.gz").dataobj)
    assert np.array_equal(ct["image"], preprocess_volume(volume, plan, modality="CT")[ct["meta"]["z"]])

    with pytest.raises(SystemExit):  # a multi-structure plan trains one structure at a time
        train.main(["903", "0", "--source", "CT", "--epochs", "1", "--num-workers", "0"])
    for value in ("1", "2"):
        run(train.main, ["903", "0", "--source", "CT", "--mode", "box", "--label", value, "--epochs", "1",
                         "--batch-size", "2", "--lr", "1e-3", "--num-workers", "0"])
    model = trees["results"] / "Dataset903_TwoOrgans" / "DeSAMTrainer__DeSAMPlans_tiny__box__src-CT"
    assert list(class_folders(model)) == [1, 2]
    assert (class_folder(model, 2) / "fold_0" / "checkpoint_final.pth").is_file()

    out = tmp_path / "predicted"
    mr_file = trees["raw"] / "Dataset903_TwoOrgans" / "imagesTr" / "MR_0000_0000.nii.gz"
    run(predict.main, ["-i", str(mr_file), "-o", str(out), "-m", str(model),
                       "--modality", "MR", "--save-probabilities", "--postprocess", "none"])
    mask = np.asarray(nib.load(out / "MR_0000.nii.gz").dataobj)
    assert mask.shape == volume.shape and set(np.unique(mask)) <= {0, 1, 2}
    probabilities = np.load(out / "MR_0000.npz")["probabilities"]
    assert probabilities.shape == (2, *volume.shape)
    held = probabilities > 0.5
    assert np.array_equal(mask > 0, held.any(axis=0))
    assert (class_folder(out, 1) / "quality" / "MR_0000.csv").is_file()

    run(evaluate.main, ["-d", "903", "--source", "CT", "--mode", "box", "--protocol", "full", "paper", "-f", "0"])
    for protocol in ("full", "paper"):
        evaluation = model / "evaluation" / protocol
        liver = pd.read_csv(evaluation / "liver" / "per_case.csv", dtype={"case": str})
        spleen = pd.read_csv(evaluation / "spleen" / "per_case.csv", dtype={"case": str})
        mean = pd.read_csv(evaluation / "per_case.csv", dtype={"case": str})
        assert set(mean["site"]) == {"CT", "MR"} and len(mean) == len(liver) == 3  # 2 MR + 1 held-out CT
        assert np.allclose(mean["dice"], (liver["dice"] + spleen["dice"]) / 2, equal_nan=True)
        assert (evaluation / "liver" / "per_site.csv").is_file()
    assert (model / "evaluation" / "full" / "spleen" / "per_slice.csv").is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_joint_network_end_to_end(trees, tmp_path):
    """`-tr DeSAMJointTrainer`: one grid-mode network for both structures, validated, predicted and evaluated per
    structure like the per-structure models."""
    from desam_pipeline.inference import predict
    from desam_pipeline.inference.model import load_model
    from desam_pipeline.io.results_layout import Checkpoint
    from desam_pipeline.training import train
    from evaluation import evaluate
    from plans import plan_and_embed

    write_two_structure_dataset(trees["raw"])
    run(plan_and_embed.main, ["-d", "903", "--encoder", "tiny"])
    joint = ["903", "0", "-tr", "DeSAMJointTrainer", "--source", "CT", "--mode", "grid", "--epochs", "1",
             "--batch-size", "2", "--lr", "1e-3", "--num-workers", "0", "--val-grid", "3", "--val-grid-rule", "top1"]
    with pytest.raises(SystemExit):  # every structure at once: no --label
        train.main([*joint, "--label", "1"])
    run(train.main, joint)
    model = trees["results"] / "Dataset903_TwoOrgans" / "DeSAMJointTrainer__DeSAMPlans_tiny__grid__src-CT"
    assert class_folders(model) == {}
    fold = model / "fold_0"
    checkpoint = Checkpoint.load(fold / "checkpoint_final.pth")
    assert checkpoint.network_config["structures"] == [1, 2]
    assert checkpoint.network["prim.structure_tokens"].shape[0] == 2
    assert set(checkpoint.gate_calibration) == {"structures"} and set(checkpoint.gate_calibration["structures"]) == \
        {"1", "2"}
    summary = json.loads((fold / "validation" / "summary.json").read_text(encoding="utf-8"))
    assert set(summary["structures"]) == {"1", "2"}
    dice = [summary["structures"][v]["mean"]["dice"] for v in ("1", "2")]
    assert summary["mean"]["dice"] == pytest.approx(np.mean(dice))
    held_out = summary["structures"]["1"]["cases"]
    assert all((class_folder(fold / "validation", v) / f"{case}.nii.gz").is_file() for v in (1, 2) for case in held_out)

    loaded = load_model(model)
    assert [m.label_value for m in loaded.structures] == [1, 2]
    first, second = (m.networks[0] for m in loaded.structures)
    assert first.pdmm is second.pdmm and first.prim.structure == 0 and second.prim.structure == 1

    out = tmp_path / "predicted"
    mr_file = trees["raw"] / "Dataset903_TwoOrgans" / "imagesTr" / "MR_0000_0000.nii.gz"
    run(predict.main, ["-i", str(mr_file), "-o", str(out), "-m", str(model), "--modality", "MR",
                       "--save-probabilities", "--postprocess", "none", "--grid", "3", "--grid-rule", "top1"])
    mask = np.asarray(nib.load(out / "MR_0000.nii.gz").dataobj)
    assert set(np.unique(mask)) <= {0, 1, 2}
    assert np.load(out / "MR_0000.npz")["probabilities"].shape == (2, *mask.shape)
    # each structure is asked for with its own token: the slices' predicted IoUs differ between them
    quality = [pd.read_csv(class_folder(out, v) / "quality" / "MR_0000.csv") for v in (1, 2)]
    assert len(quality[0]) == len(quality[1]) == mask.shape[-1]
    assert not np.allclose(quality[0]["predicted_iou"], quality[1]["predicted_iou"])

    run(evaluate.main, ["-d", "903", "-tr", "DeSAMJointTrainer", "--source", "CT", "--mode", "grid", "--protocol",
                        "full", "-f", "0", "--grid", "3", "--grid-rule", "top1"])
    evaluation = model / "evaluation" / "full"
    liver = pd.read_csv(evaluation / "liver" / "per_case.csv", dtype={"case": str})
    spleen = pd.read_csv(evaluation / "spleen" / "per_case.csv", dtype={"case": str})
    mean = pd.read_csv(evaluation / "per_case.csv", dtype={"case": str})
    assert len(mean) == len(liver) == 3 and np.allclose(mean["dice"], (liver["dice"] + spleen["dice"]) / 2,
                                                        equal_nan=True)
