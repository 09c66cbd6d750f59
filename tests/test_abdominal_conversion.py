"""Abdominal CT/MR conversion: processed (SLAug), BTCV and CHAOS layouts, classes kept, and the phantom."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_dilation

from dataset_conversion import convert_abdominal as abdominal_cli
from dataset_conversion.chaos_dicom import GREY_LEVELS
from dataset_conversion.convert_abdominal import BTCV_CLASSES, convert_abdominal
from dataset_conversion.make_abdominal_phantom import AbdominalCase, generate_case, make_abdominal_phantom
from dataset_conversion.raw_writer import SourceCase, write_raw_dataset
from desam_pipeline.data.dataset_checks import verify_dataset
from desam_pipeline.utilities.errors import DesamError

SHAPE = (14, 11, 6)
ORGANS = {"background": 0, "liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def oblique_affine(seed: int) -> np.ndarray:
    """A rotated, anisotropic, translated affine, so that kept geometry is proven."""
    angle = 0.25 + 0.1 * seed
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, -0.75, 5.0])
    affine[:3, 3] = [120.5 - seed, 80.25, -40.0]
    return affine


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 1)
    nib.save(image, str(path))
    return path


def class_volume(rng: np.random.Generator, values, shape=SHAPE) -> np.ndarray:
    """A random label volume of `values`, each of them present (in the first voxels)."""
    values = np.asarray(list(values))
    label = rng.choice(values, size=shape).astype(np.uint8)
    label.reshape(-1)[: values.size] = values
    return label


def stored(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def dataset_meta(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text(encoding="utf-8"))


def write_processed(root: Path, sites: dict[str, list[int]], seed: int = 0) -> dict[tuple[str, int], tuple]:
    """SLAug layout: <SITE>/processed/image_<id> (int16 / float32) + label_<id> with classes 0-4."""
    rng = np.random.default_rng(seed)
    written = {}
    for site, ids in sites.items():
        for n in ids:
            affine = oblique_affine(n)
            image = rng.integers(-1000, 1500, SHAPE).astype(np.int16 if site == "SABSCT" else np.float32)
            label = class_volume(rng, range(5))
            save(root / site / "processed" / f"image_{n}.nii.gz", image, affine)
            save(root / site / "processed" / f"label_{n}.nii.gz", label, affine)
            written[(site, n)] = (image, label, affine)
    return written


def test_processed_layout_keeps_classes_and_images(tmp_path):
    written = write_processed(tmp_path / "src", {"SABSCT": [0, 7], "CHAOST2": [1, 38]})
    folder = convert_abdominal(tmp_path / "src", tmp_path / "raw", dataset=4)
    assert folder == tmp_path / "raw" / "Dataset004_AbdominalCTMR"
    meta = dataset_meta(folder)
    assert meta["labels"] == ORGANS
    assert meta["channel_names"] == {"0": "CT/MR"}
    assert meta["modalities"] == {"CT": "CT", "MR": "MR"}
    assert meta["domains"] == {"CT_0000": "CT", "CT_0007": "CT", "MR_0001": "MR", "MR_0038": "MR"}
    assert meta["numTraining"] == 4
    for (site, n), (image, label, affine) in written.items():
        case = f"{'CT' if site == 'SABSCT' else 'MR'}_{n:04d}"
        converted_image = nib.load(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        assert converted_image.get_data_dtype() == image.dtype
        assert np.array_equal(np.asanyarray(converted_image.dataobj), image)
        assert np.allclose(converted_image.affine, affine)
        converted_label = stored(folder / "labelsTr" / f"{case}.nii.gz")
        assert converted_label.dtype == np.uint8
        assert np.array_equal(converted_label, label)  # classes 0-4 kept, not binarised
    assert verify_dataset(folder) == []


def test_one_modality_names_its_channel(tmp_path):
    write_processed(tmp_path / "src", {"CHAOST2": [2]})
    meta = dataset_meta(convert_abdominal(tmp_path / "src", tmp_path / "raw"))
    assert meta["channel_names"] == {"0": "MR"} and meta["modalities"] == {"MR": "MR"}
    assert meta["domains"] == {"MR_0002": "MR"}


def test_raw_writer_binarises_without_a_label_map_and_keeps_classes_with_one(tmp_path):
    rng = np.random.default_rng(3)
    label = class_volume(rng, [0, 2, 5])
    image = save(tmp_path / "src" / "a.nii.gz", rng.integers(0, 99, SHAPE).astype(np.int16), oblique_affine(0))
    mask = save(tmp_path / "src" / "a_seg.nii.gz", label, oblique_affine(0))
    binary = write_raw_dataset([SourceCase("S_a", "S", image, mask)], tmp_path / "raw", "Dataset010_B", "binary")
    assert np.array_equal(stored(binary / "labelsTr" / "S_a.nii.gz"), (label > 0).astype(np.uint8))
    assert dataset_meta(binary)["labels"] == {"background": 0, "prostate": 1}
    assert dataset_meta(binary)["channel_names"] == {"0": "T2"} and "modalities" not in dataset_meta(binary)
    classes = write_raw_dataset([SourceCase("S_a", "S", image, mask, label_map={0: 0, 2: 1, 5: 2})], tmp_path / "raw",
                                "Dataset011_C", "classes", labels={"background": 0, "x": 1, "y": 2})
    expected = np.select([label == 2, label == 5], [1, 2], 0)
    assert np.array_equal(stored(classes / "labelsTr" / "S_a.nii.gz"), expected)


def write_btcv(root: Path, numbers: list[int], seed: int = 0) -> dict[int, np.ndarray]:
    """Synapse layout img/imgNNNN + label/labelNNNN with all 13 organ values present."""
    rng = np.random.default_rng(seed)
    labels = {}
    for n in numbers:
        affine = oblique_affine(n)
        save(root / "img" / f"img{n:04d}.nii.gz", rng.integers(-1024, 2000, SHAPE).astype(np.int16), affine)
        labels[n] = class_volume(rng, range(14))
        save(root / "label" / f"label{n:04d}.nii.gz", labels[n], affine)
    return labels


def test_btcv_thirteen_organs_become_four_voxel_by_voxel(tmp_path):
    training = tmp_path / "src" / "Abdomen" / "RawData" / "Training"
    labels = write_btcv(training, [1, 40])
    (tmp_path / "src" / "Abdomen" / "RawData" / "Testing" / "img").mkdir(parents=True)  # no labels: not a layout
    folder = convert_abdominal(tmp_path / "src", tmp_path / "raw")
    meta = dataset_meta(folder)
    assert meta["domains"] == {"CT_0001": "CT", "CT_0040": "CT"}
    assert meta["channel_names"] == {"0": "CT"}
    expected_of = {0: 0, 1: 4, 2: 2, 3: 3, 6: 1}  # spleen, right kidney, left kidney, liver; all else background
    for n, source in labels.items():
        converted = stored(folder / "labelsTr" / f"CT_{n:04d}.nii.gz")
        for value in range(14):
            assert np.all(converted[source == value] == expected_of.get(value, 0)), value
    assert BTCV_CLASSES == {**{v: 0 for v in range(14)}, **{1: 4, 2: 2, 3: 3, 6: 1}}
    assert verify_dataset(folder) == []


def assert_one_line_error(capsys, argv: list[str], *fragments: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        abdominal_cli.main(argv)
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("desam: error:")]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_nothing_published(raw: Path) -> None:
    assert not raw.exists() or list(raw.iterdir()) == []


def test_btcv_unknown_label_value_is_a_one_line_error(tmp_path, capsys):
    labels = write_btcv(tmp_path / "src", [2, 3])
    bad = labels[3].copy()
    bad[0, 0, 0] = 14
    save(tmp_path / "src" / "label" / "label0003.nii.gz", bad, oblique_affine(3))
    assert_one_line_error(capsys, [str(tmp_path / "src"), "--raw", str(tmp_path / "raw")],
                          "label0003.nii.gz", "label value(s) 14 not among")
    assert_nothing_published(tmp_path / "raw")


def test_processed_label_outside_the_four_organs_is_an_error(tmp_path):
    write_processed(tmp_path / "src", {"SABSCT": [1]})
    save(tmp_path / "src" / "SABSCT" / "processed" / "label_1.nii.gz", np.full(SHAPE, 6, np.uint8), oblique_affine(1))
    with pytest.raises(DesamError, match=r"label_1\.nii\.gz: label value\(s\) 6 not among"):
        convert_abdominal(tmp_path / "src", tmp_path / "raw")
    assert_nothing_published(tmp_path / "raw")


@pytest.mark.parametrize("remove, message", [("img/img0005.nii.gz", "label0005.nii.gz: label without image"),
                                             ("label/label0005.nii.gz", "img0005.nii.gz: image without label")])
def test_btcv_unpaired_files(tmp_path, remove, message):
    write_btcv(tmp_path / "src", [4, 5])
    (tmp_path / "src" / remove).unlink()
    with pytest.raises(DesamError, match=message):
        convert_abdominal(tmp_path / "src", tmp_path / "raw")


def test_unknown_layout_lists_what_was_found_and_what_is_understood(tmp_path, capsys):
    (tmp_path / "src" / "scans").mkdir(parents=True)
    (tmp_path / "src" / "notes.txt").write_text("x", encoding="utf-8")
    line = assert_one_line_error(capsys, [str(tmp_path / "src"), "--raw", str(tmp_path / "raw")],
                                 "no abdominal layout found", "notes.txt", "scans/", "SABSCT/processed",
                                 "img/img<NNNN>", "T2SPIR/Ground")
    assert str(tmp_path / "src") in line
    assert_one_line_error(capsys, [str(tmp_path / "missing"), "--raw", str(tmp_path / "raw")],
                          "missing: source folder not found")


# ---- CHAOS: a DICOM series written with SimpleITK, PNG ground truth with the CHAOS grey levels ----

ROWS, COLUMNS, SLICES = 10, 13, 5
SPACING = (0.7, 0.9, 6.5)             # column spacing (x), row spacing (y), slice gap


def chaos_direction(seed: int) -> np.ndarray:
    """An oblique LPS direction matrix (columns: row direction, column direction, normal)."""
    a, b = 0.2 + 0.05 * seed, -0.15
    tilt = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    turn = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return turn @ tilt


def write_chaos_patient(series: Path, seed: int, truth: np.ndarray, pixels: np.ndarray, level_noise: int = 3,
                        origin=(-170.5, -140.25, 30.0)) -> None:
    """DICOM slices k = 0.. at increasing positions along the normal, named in the *opposite* order
    (IMG-0002-00001 is the highest slice, as many scanners number them), and one PNG per slice with the
    same stem holding truth[k] as CHAOS grey levels (+- level noise)."""
    rng = np.random.default_rng(seed)
    volume = sitk.GetImageFromArray(pixels)
    volume.SetSpacing(SPACING)
    volume.SetOrigin(origin)
    direction = chaos_direction(seed)
    volume.SetDirection(tuple(direction.ravel()))
    (series / "DICOM_anon").mkdir(parents=True)
    (series / "Ground").mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    centre = {value: (low + high) // 2 for value, low, high in GREY_LEVELS}
    for k in range(SLICES):
        stem = f"IMG-0002-{SLICES - k:05d}"
        image_slice = volume[:, :, k]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0008|0060", "MR"), ("0020|000e", f"1.2.826.0.1.3680043.2.1125.{seed}.7"),
                           ("0020|0013", str(SLICES - k)),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1]))),
                           ("0020|0032", "\\".join(f"{v:.4f}" for v in position))):
            image_slice.SetMetaData(tag, value)
        writer.SetFileName(str(series / "DICOM_anon" / f"{stem}.dcm"))
        writer.Execute(image_slice)
        grey = np.zeros((ROWS, COLUMNS), np.uint8)
        for value, level in centre.items():
            inside = truth[k] == value
            grey[inside] = level + rng.integers(-level_noise, level_noise + 1, int(inside.sum()))
        sitk.WriteImage(sitk.GetImageFromArray(grey), str(series / "Ground" / f"{stem}.png"))


def chaos_truth(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes, pixels) in [slice by position, row, column]: asymmetric, so flips and transposes show."""
    rng = np.random.default_rng(seed)
    truth = class_volume(rng, range(5), (SLICES, ROWS, COLUMNS))
    truth[:, :3, :4] = 1
    truth[-1] = 0
    pixels = rng.integers(0, 3000, (SLICES, ROWS, COLUMNS)).astype(np.int16)
    return truth, pixels


def expected_ras_affine(seed: int, origin=(-170.5, -140.25, 30.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ chaos_direction(seed) @ np.diag(SPACING)
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(origin)
    return affine


def test_chaos_geometry_from_headers_and_png_slice_row_column_correspondence(tmp_path):
    truths = {}
    for patient, seed in (("1", 1), ("22", 2)):
        truth, pixels = chaos_truth(seed)
        write_chaos_patient(tmp_path / "src" / "CHAOS_Train_Sets" / "Train_Sets" / "MR" / patient / "T2SPIR",
                            seed, truth, pixels)
        truths[patient] = (seed, truth, pixels)
    (tmp_path / "src" / "CHAOS_Train_Sets" / "Train_Sets" / "CT" / "1" / "DICOM_anon").mkdir(parents=True)
    folder = convert_abdominal(tmp_path / "src", tmp_path / "raw")
    meta = dataset_meta(folder)
    assert meta["domains"] == {"MR_0001": "MR", "MR_0022": "MR"}
    assert meta["channel_names"] == {"0": "MR"}
    for patient, (seed, truth, pixels) in truths.items():
        case = f"MR_{int(patient):04d}"
        image = nib.load(str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        label = nib.load(str(folder / "labelsTr" / f"{case}.nii.gz"))
        assert image.shape == (COLUMNS, ROWS, SLICES)
        assert np.allclose(image.affine, expected_ras_affine(seed), atol=1e-3)
        assert np.allclose(label.affine, image.affine)
        # NIfTI voxel (i, j, k) = DICOM column i, row j of the k-th slice along the normal
        assert np.array_equal(np.asanyarray(image.dataobj), pixels.transpose(2, 1, 0))
        assert np.array_equal(np.asanyarray(label.dataobj), truth.transpose(2, 1, 0))
    assert verify_dataset(folder) == []
    assert [p.name for p in (tmp_path / "raw").iterdir()] == [folder.name]  # the staging folder is gone


def chaos_series(tmp_path: Path, seed: int = 1) -> Path:
    truth, pixels = chaos_truth(seed)
    series = tmp_path / "src" / "MR" / "3" / "T2SPIR"
    write_chaos_patient(series, seed, truth, pixels)
    return series


def test_chaos_stray_grey_level_is_a_one_line_error_naming_the_png(tmp_path, capsys):
    series = chaos_series(tmp_path)
    png = series / "Ground" / "IMG-0002-00002.png"
    grey = sitk.GetArrayFromImage(sitk.ReadImage(str(png)))
    grey[4, 5] = 100
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(png))
    assert_one_line_error(capsys, [str(tmp_path / "src"), "--raw", str(tmp_path / "raw")],
                          "IMG-0002-00002.png: grey level(s) 100 match no organ")
    assert_nothing_published(tmp_path / "raw")


def remove_one_png(series: Path) -> None:
    (series / "Ground" / "IMG-0002-00003.png").unlink()


def remove_ground(series: Path) -> None:
    shutil.rmtree(series / "Ground")


def transpose_one_png(series: Path) -> None:
    transposed = sitk.GetImageFromArray(np.zeros((COLUMNS, ROWS), np.uint8))
    sitk.WriteImage(transposed, str(series / "Ground" / "IMG-0002-00004.png"))


def remove_one_slice(series: Path) -> None:
    (series / "DICOM_anon" / "IMG-0002-00003.dcm").unlink()
    (series / "Ground" / "IMG-0002-00003.png").unlink()


def corrupt_one_dicom(series: Path) -> None:
    (series / "DICOM_anon" / "IMG-0002-00001.dcm").write_bytes(b"not a DICOM file")


@pytest.mark.parametrize("damage, message", [
    (remove_one_png, "Ground: 4 PNG files for 5 DICOM slices"),
    (remove_ground, "T2SPIR: no Ground/ folder"),
    (transpose_one_png, "IMG-0002-00004.png: 13 rows x 10 columns, but its DICOM slice IMG-0002-00004.dcm has 10 x 13"),
    (remove_one_slice, "IMG-0002-00002.dcm: 13.000 mm from IMG-0002-00004.dcm where .*missing or repeated slice"),
    (corrupt_one_dicom, "IMG-0002-00001.dcm: cannot read DICOM header"),
], ids=["remove_one_png", "remove_ground", "transpose_one_png", "remove_one_slice", "corrupt_one_dicom"])
def test_chaos_bad_series(tmp_path, damage, message):
    damage(chaos_series(tmp_path))
    with pytest.raises(DesamError, match=message):
        convert_abdominal(tmp_path / "src", tmp_path / "raw")
    assert_nothing_published(tmp_path / "raw")


def test_btcv_and_chaos_together_in_one_folder_or_as_two_sources(tmp_path, monkeypatch, capsys):
    write_btcv(tmp_path / "both" / "BTCV", [1])
    truth, pixels = chaos_truth(5)
    write_chaos_patient(tmp_path / "both" / "CHAOS" / "MR" / "1" / "T2SPIR", 5, truth, pixels)
    meta = dataset_meta(convert_abdominal(tmp_path / "both", tmp_path / "raw"))
    assert meta["domains"] == {"CT_0001": "CT", "MR_0001": "MR"}
    assert meta["channel_names"] == {"0": "CT/MR"} and meta["modalities"] == {"CT": "CT", "MR": "MR"}

    monkeypatch.setenv("DESAM_RAW", str(tmp_path / "raw2"))
    with pytest.raises(SystemExit) as exit_info:
        abdominal_cli.main([str(tmp_path / "both" / "BTCV"), str(tmp_path / "both" / "CHAOS"), "-d", "7"])
    assert exit_info.value.code == 0
    assert "Dataset007_AbdominalCTMR: 2 cases (CT 1, MR 1)" in capsys.readouterr().out
    folder = tmp_path / "raw2" / "Dataset007_AbdominalCTMR"
    assert dataset_meta(folder)["domains"] == meta["domains"]
    assert verify_dataset(folder) == []


# ---- the abdominal phantom: processed layout, deterministic, the two modalities differ ----

ORGAN_NAMES = ("liver", "right_kidney", "left_kidney", "spleen")


@pytest.fixture(scope="module")
def phantom_cases() -> dict[str, AbdominalCase]:
    return {domain: generate_case(domain, 1, seed=0) for domain in ("CT", "MR")}


def world_centroid(case: AbdominalCase, value: int) -> np.ndarray:
    """RAS centroid (mm) of a class: +x towards the patient's right, +y anterior, +z superior."""
    index = np.argwhere(case.label == value).mean(axis=0)
    return case.affine[:3, :3] @ index + case.affine[:3, 3]


def test_phantom_organs_at_plausible_places_with_organ_free_end_slices(phantom_cases):
    for domain, case in phantom_cases.items():
        assert case.image.shape == case.label.shape and case.label.dtype == np.uint8
        assert set(np.unique(case.label)) == set(ORGANS.values()), domain
        centre = {name: world_centroid(case, ORGANS[name]) for name in ORGAN_NAMES}
        # liver and right kidney on the patient's right (larger RAS x) of spleen and left kidney
        assert centre["liver"][0] > centre["spleen"][0] + 60
        assert centre["right_kidney"][0] > centre["left_kidney"][0] + 60
        for kidney in ("right_kidney", "left_kidney"):
            assert centre[kidney][1] < centre["liver"][1] and centre[kidney][1] < centre["spleen"][1]  # posterior
        assert centre["right_kidney"][2] < centre["liver"][2]
        volumes = {name: int((case.label == ORGANS[name]).sum()) for name in ORGAN_NAMES}
        assert max(volumes, key=volumes.get) == "liver"
        occupied = np.nonzero(case.label.any(axis=(0, 1)))[0]
        assert occupied[0] >= 2 and occupied[-1] <= case.label.shape[2] - 3, (domain, occupied)


def organ_medians(case: AbdominalCase) -> dict[str, float]:
    return {name: float(np.median(case.image[case.label == ORGANS[name]])) for name in ORGAN_NAMES}


def test_phantom_contrasts_and_geometry_differ_between_ct_and_mr(phantom_cases):
    ct, mr = phantom_cases["CT"], phantom_cases["MR"]
    assert ct.image.dtype == np.int16 and mr.image.dtype == np.uint16
    ct_levels, mr_levels = organ_medians(ct), organ_medians(mr)
    assert ct_levels["liver"] > ct_levels["spleen"] and mr_levels["spleen"] > mr_levels["liver"]
    assert sorted(ORGAN_NAMES, key=ct_levels.get) != sorted(ORGAN_NAMES, key=mr_levels.get)
    assert 40 < ct_levels["spleen"] < ct_levels["liver"] < 80 < 140 < ct_levels["right_kidney"]  # Hounsfield units
    assert np.median(ct.image[:, :, 0][:20, :20]) < -900   # air in a corner of the field of view
    assert ct.info["levels"]["fat"] < 0 < ct.info["levels"]["liver"]
    assert mr.info["levels"]["fat"] > mr.info["levels"]["liver"]
    ct_spacing, mr_spacing = ct.info["spacing"], mr.info["spacing"]
    assert ct_spacing[0] < mr_spacing[0] and ct_spacing[2] < mr_spacing[2]
    assert np.allclose(np.abs(np.diag(ct.affine)[:3]), ct_spacing, atol=1e-4)


def test_phantom_organs_stand_out_from_their_surroundings(phantom_cases):
    """Each organ's median differs from that of a 3-voxel ring around it by several noise sigmas."""
    for domain, case in phantom_cases.items():
        noise = case.info["noise_sigma"] * case.info["storage_scale"]
        for name in ORGAN_NAMES:
            organ = case.label == ORGANS[name]
            ring = binary_dilation(organ, iterations=3, structure=np.ones((3, 3, 1), bool)) & (case.label == 0)
            contrast = abs(np.median(case.image[organ]) - np.median(case.image[ring])) / noise
            assert contrast > 3.0, (domain, name, contrast)


def test_phantom_case_is_a_function_of_seed_modality_and_number():
    first, again = generate_case("MR", 2, seed=4), generate_case("MR", 2, seed=4)
    assert first.image.tobytes() == again.image.tobytes() and first.label.tobytes() == again.label.tobytes()
    assert np.array_equal(first.affine, again.affine) and first.info == again.info
    for other in (generate_case("MR", 2, seed=5), generate_case("MR", 3, seed=4)):
        assert other.image.shape != first.image.shape or not np.array_equal(other.image, first.image)


@pytest.mark.parametrize("kwargs, message", [({"cases_per_site": 0}, "at least 1"),
                                             ({"domains": ["PET"]}, "unknown phantom modality")])
def test_phantom_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(DesamError, match=message):
        make_abdominal_phantom(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_phantom_writes_the_processed_layout_that_converts_and_verifies(tmp_path):
    out = make_abdominal_phantom(tmp_path / "phantom", cases_per_site=2, seed=0)
    description = json.loads((out / "phantom.json").read_text(encoding="utf-8"))
    assert description["labels"] == ORGANS and set(description["modalities"]) == {"CT", "MR"}
    assert set(description["cases"]) == {"CT_0001", "CT_0002", "MR_0001", "MR_0002"}
    written = nib.load(str(out / "SABSCT" / "processed" / "image_2.nii.gz"))
    expected = generate_case("CT", 2, seed=0)
    assert np.array_equal(np.asanyarray(written.dataobj), expected.image)
    assert np.array_equal(written.affine, expected.affine)
    assert np.array_equal(stored(out / "SABSCT" / "processed" / "label_2.nii.gz"), expected.label)
    assert description["cases"]["CT_0002"]["shape"] == list(expected.image.shape)

    folder = convert_abdominal(out, tmp_path / "raw", dataset=5)
    meta = dataset_meta(folder)
    assert meta["domains"] == {"CT_0001": "CT", "CT_0002": "CT", "MR_0001": "MR", "MR_0002": "MR"}
    assert meta["channel_names"] == {"0": "CT/MR"} and meta["labels"] == ORGANS
    assert np.array_equal(stored(folder / "labelsTr" / "MR_0001.nii.gz"), generate_case("MR", 1, seed=0).label)
    assert verify_dataset(folder) == []
