"""Converters: the three multi-site layouts and MSD, geometry kept exactly, labels binarised, clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dataset_conversion import convert_msd, convert_prostate_multisite
from dataset_conversion.convert_msd import convert_msd as run_msd
from dataset_conversion.convert_prostate_multisite import convert_prostate_multisite as run_multisite
from desam_pipeline.data.dataset_checks import verify_dataset
from desam_pipeline.io.nifti_io import read_volume
from desam_pipeline.utilities.errors import DesamError

SHAPE = (12, 10, 5)
NNUNET_V2_KEYS = {"channel_names", "labels", "numTraining", "file_ending"}


def oblique_affine(seed: int) -> np.ndarray:
    """A rotated, anisotropic, translated affine (not just a diagonal) to prove geometry is kept."""
    angle = 0.3 + 0.1 * seed
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.6, 0.7, 3.3])
    affine[:3, 3] = [-40.5 + seed, 12.25, 7.0]
    return affine


def save(path: Path, array: np.ndarray, affine: np.ndarray, slope: float | None = None,
         inter: float = 0.0) -> Path:
    """Write a NIfTI with distinct qform/sform codes and optional scaling."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 2)
    if slope is not None:
        image.header.set_slope_inter(slope, inter)
    nib.save(image, str(path))
    return path


def pair(rng: np.random.Generator, seed: int, zones: bool = False, shape=SHAPE):
    """An int16 image and a mask with foreground (zones {1, 2} when asked)."""
    image = rng.integers(0, 900, size=shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[3:8, 3:7, 1:4] = 1
    if zones:
        label[3:5, 3:7, 1:4] = 2
    return image, label, oblique_affine(seed)


def write_saml(root: Path, cases: dict[str, list[int]], rng=None) -> Path:
    """Site folders with CaseNN + CaseNN_segmentation (BMC: _Segmentation; RUNMC/BMC zone labels)."""
    rng = rng or np.random.default_rng(0)
    for site, numbers in cases.items():
        for n in numbers:
            image, label, affine = pair(rng, n, zones=site in ("RUNMC", "BMC"))
            suffix = "_Segmentation" if site == "BMC" else "_segmentation"
            save(root / site / f"Case{n:02d}.nii.gz", image, affine)
            save(root / site / f"Case{n:02d}{suffix}.nii.gz", label, affine)
    return root


def dataset_files(folder: Path) -> tuple[dict, list[str], list[str]]:
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    images = sorted(p.name for p in (folder / "imagesTr").iterdir())
    labels = sorted(p.name for p in (folder / "labelsTr").iterdir())
    return meta, images, labels


def assert_nothing_published(raw: Path) -> None:
    """A failed conversion leaves neither a dataset folder nor a temporary one behind."""
    assert not raw.exists() or list(raw.iterdir()) == []


def test_saml_layout_quirks_and_nnunet_v2_format(tmp_path):
    source = write_saml(tmp_path / "src", {"RUNMC": [0, 3], "BMC": [0], "UCL": [1, 26], "HK": [38]})
    (source / "RUNMC" / "._Case00.nii.gz").write_bytes(b"macOS resource fork")
    (source / "__MACOSX").mkdir()
    folder = run_multisite(source, tmp_path / "raw")
    assert folder == tmp_path / "raw" / "Dataset001_ProstateMultiSite"
    meta, images, labels = dataset_files(folder)
    expected = ["BMC_Case00", "HK_Case38", "RUNMC_Case00", "RUNMC_Case03", "UCL_Case01", "UCL_Case26"]
    assert images == [f"{c}_0000.nii.gz" for c in expected]
    assert labels == [f"{c}.nii.gz" for c in expected]
    assert NNUNET_V2_KEYS <= set(meta)
    assert meta["channel_names"] == {"0": "T2"}
    assert meta["labels"] == {"background": 0, "prostate": 1}
    assert meta["numTraining"] == 6 and meta["file_ending"] == ".nii.gz"
    assert meta["domains"] == {c: c.split("_")[0] for c in expected}
    assert verify_dataset(folder) == []


def test_geometry_and_stored_voxels_round_trip(tmp_path):
    """Images keep affine, qform/sform, stored dtype, stored values and scaling; labels keep geometry."""
    rng = np.random.default_rng(1)
    image, label, affine = pair(rng, 0, zones=True)
    label_affine = affine.copy()
    label_affine[0, 3] += 5e-6  # within tolerance: the mask keeps its own header
    source_image = save(tmp_path / "src" / "RUNMC" / "Case07.nii.gz", image, affine, slope=0.5, inter=-3.0)
    source_label = save(tmp_path / "src" / "RUNMC" / "Case07_segmentation.nii.gz", label * 3, label_affine)
    folder = run_multisite(tmp_path / "src", tmp_path / "raw")

    before, after = nib.load(str(source_image)), nib.load(str(folder / "imagesTr" / "RUNMC_Case07_0000.nii.gz"))
    assert np.array_equal(after.affine, before.affine)
    assert np.array_equal(after.get_qform(), before.get_qform())
    assert np.array_equal(after.get_sform(), before.get_sform())
    assert int(after.header["qform_code"]) == 1 and int(after.header["sform_code"]) == 2
    assert after.get_data_dtype() == np.int16
    assert (after.dataobj.slope, after.dataobj.inter) == (0.5, -3.0)
    assert np.array_equal(np.asanyarray(after.dataobj.get_unscaled()), image)
    assert np.array_equal(read_volume(after.get_filename())[0], read_volume(source_image)[0])

    converted = nib.load(str(folder / "labelsTr" / "RUNMC_Case07.nii.gz"))
    assert np.array_equal(converted.affine, nib.load(str(source_label)).affine)
    assert converted.get_data_dtype() == np.uint8
    stored = np.asanyarray(converted.dataobj)
    assert set(np.unique(stored).tolist()) == {0, 1}
    assert np.array_equal(stored, (label > 0).astype(np.uint8))


def test_wrapper_folders_are_looked_through(tmp_path):
    write_saml(tmp_path / "download" / "Processed_data_nii", {"I2CVB": [4]})
    folder = run_multisite(tmp_path / "download", tmp_path / "raw", dataset=7)
    assert folder.name == "Dataset007_ProstateMultiSite"
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["domains"] == {"I2CVB_Case04": "I2CVB"}


def test_maxstyle_layout(tmp_path):
    rng = np.random.default_rng(2)
    source = tmp_path / "reorganized"
    for folder, patient in (("A-ISBI", "patient_1"), ("A-ISBI", "patient_10"), ("E-BIDMC", "patient_2"),
                            ("G-MedicalDecathlon", "patient_3")):
        image, label, affine = pair(rng, 1)
        save(source / folder / patient / "t2_img_clipped.nii.gz", image.astype(np.float32), affine)
        save(source / folder / patient / "label_clipped.nii.gz", label.astype(np.float32), affine)
    folder = run_multisite(source, tmp_path / "raw")
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert meta["domains"] == {"BIDMC_patient_2": "BIDMC", "MSD_patient_3": "MSD",
                               "RUNMC_patient_1": "RUNMC", "RUNMC_patient_10": "RUNMC"}
    assert verify_dataset(folder) == []


def write_nnunet_repack(root: Path, rng) -> Path:
    for name in ("prostate_001", "prostate_012", "prostate_113"):
        image, label, affine = pair(rng, 2)
        save(root / "imagesTr" / f"{name}_0000.nii.gz", image, affine)
        save(root / "labelsTr" / f"{name}.nii.gz", label, affine)
    (root / "prostate_patientid.csv").write_text("patientid,center\n1,A-ISBI\n12,F-HK\n113,C-I2CVB\n", encoding="utf-8")
    return root


def test_nnunet_repackaging_with_patient_csv(tmp_path):
    folder = run_multisite(write_nnunet_repack(tmp_path / "raw_data", np.random.default_rng(3)), tmp_path / "raw")
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert meta["domains"] == {"HK_prostate_012": "HK", "I2CVB_prostate_113": "I2CVB",
                               "RUNMC_prostate_001": "RUNMC"}
    assert verify_dataset(folder) == []


def test_nnunet_repackaging_patient_missing_from_csv(tmp_path):
    source = write_nnunet_repack(tmp_path / "raw_data", np.random.default_rng(3))
    (source / "prostate_patientid.csv").write_text("patientid,center\n1,A-ISBI\n12,F-HK\n", encoding="utf-8")
    with pytest.raises(DesamError, match=r"prostate_113_0000\.nii\.gz: patient prostate_113 is not listed"):
        run_multisite(source, tmp_path / "raw")
    assert_nothing_published(tmp_path / "raw")


def test_unknown_layout_names_understood_layouts_and_what_was_found(tmp_path):
    (tmp_path / "src" / "scans").mkdir(parents=True)
    (tmp_path / "src" / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DesamError) as error:
        run_multisite(tmp_path / "src", tmp_path / "raw")
    message = str(error.value)
    assert "unrecognised layout" in message and "scans/" in message and "notes.txt" in message
    for layout in ("SAML/FedDG", "MaxStyle", "nnU-Net repackaging", "prostate_patientid.csv"):
        assert layout in message
    assert "\n" not in message
    assert_nothing_published(tmp_path / "raw")


def test_msd_folder_given_to_multisite_converter_gets_a_hint(tmp_path):
    (tmp_path / "Task05_Prostate" / "imagesTr").mkdir(parents=True)
    (tmp_path / "Task05_Prostate" / "labelsTr").mkdir()
    with pytest.raises(DesamError, match="use desam_convert_msd"):
        run_multisite(tmp_path / "Task05_Prostate", tmp_path / "raw")


def test_image_without_mask(tmp_path):
    source = write_saml(tmp_path / "src", {"RUNMC": [0, 1]})
    (source / "RUNMC" / "Case01_segmentation.nii.gz").unlink()
    with pytest.raises(DesamError, match=r"Case01\.nii\.gz: image without mask"):
        run_multisite(source, tmp_path / "raw")
    assert_nothing_published(tmp_path / "raw")


def test_mask_shape_differs_from_image(tmp_path):
    source = write_saml(tmp_path / "src", {"HK": [38, 39]})
    rng = np.random.default_rng(4)
    _, label, affine = pair(rng, 0, shape=(12, 10, 6))
    save(source / "HK" / "Case39_segmentation.nii.gz", label, affine)
    with pytest.raises(DesamError, match=r"Case39_segmentation\.nii\.gz: mask shape \(12, 10, 6\) differs"):
        run_multisite(source, tmp_path / "raw")
    assert_nothing_published(tmp_path / "raw")


@pytest.mark.parametrize("file_name", ["Case01.nii.gz", "Case01_segmentation.nii.gz"])
@pytest.mark.parametrize("keep", [lambda n: 40, lambda n: n - 40], ids=["header", "voxels"])
def test_corrupt_nifti_is_one_line_naming_the_file(tmp_path, capsys, file_name, keep):
    source = write_saml(tmp_path / "src", {"BIDMC": [0, 1]})
    corrupt = source / "BIDMC" / file_name
    data = corrupt.read_bytes()
    corrupt.write_bytes(data[: keep(len(data))])
    with pytest.raises(SystemExit) as exit_info:
        convert_prostate_multisite.main([str(source), "--raw", str(tmp_path / "raw")])
    assert exit_info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("desam: error: ")]
    assert len(errors) == 1 and str(corrupt) in errors[0]
    assert_nothing_published(tmp_path / "raw")


def test_existing_dataset_needs_overwrite(tmp_path):
    source = write_saml(tmp_path / "src", {"UCL": [1]})
    folder = run_multisite(source, tmp_path / "raw")
    with pytest.raises(DesamError, match="already exists"):
        run_multisite(source, tmp_path / "raw")
    write_saml(source, {"UCL": [26]})
    assert run_multisite(source, tmp_path / "raw", overwrite=True) == folder
    assert json.loads((folder / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 2
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [folder.name]


def write_msd(root: Path, modality: dict, rng) -> Path:
    """Task05-like folder: 4D (X, Y, Z, 2) float images, labels {0, 1 PZ, 2 TZ}, a `._` junk file."""
    for n in (0, 2):
        volumes = rng.normal(300, 50, size=(*SHAPE, 2)).astype(np.float32)
        _, label, affine = pair(rng, n, zones=True)
        save(root / "imagesTr" / f"prostate_{n:02d}.nii.gz", volumes, affine)
        save(root / "labelsTr" / f"prostate_{n:02d}.nii.gz", label, affine)
    (root / "imagesTr" / "._prostate_00.nii.gz").write_bytes(b"junk")
    (root / "dataset.json").write_text(json.dumps({"name": "Prostate", "modality": modality}), encoding="utf-8")
    return root


@pytest.mark.parametrize("modality, channel", [({"0": "T2", "1": "ADC"}, 0), ({"0": "ADC", "1": "T2w"}, 1)])
def test_msd_keeps_t2_only_and_whole_gland(tmp_path, modality, channel):
    source = write_msd(tmp_path / "Task05_Prostate", modality, np.random.default_rng(5))
    folder = run_msd(tmp_path, tmp_path / "raw")
    assert folder.name == "Dataset002_ProstateMSD"
    meta, images, _ = dataset_files(folder)
    assert images == ["MSD_prostate_00_0000.nii.gz", "MSD_prostate_02_0000.nii.gz"]
    assert meta["domains"] == {"MSD_prostate_00": "MSD", "MSD_prostate_02": "MSD"}
    assert meta["labels"] == {"background": 0, "prostate": 1} and meta["channel_names"] == {"0": "T2"}
    original = nib.load(str(source / "imagesTr" / "prostate_02.nii.gz"))
    converted = nib.load(str(folder / "imagesTr" / "MSD_prostate_02_0000.nii.gz"))
    assert converted.shape == SHAPE and converted.get_data_dtype() == np.float32
    assert np.array_equal(converted.get_fdata(), original.get_fdata()[..., channel])
    assert np.array_equal(converted.affine, original.affine)
    label = np.asanyarray(nib.load(str(folder / "labelsTr" / "MSD_prostate_02.nii.gz")).dataobj)
    source_label = np.asanyarray(nib.load(str(source / "labelsTr" / "prostate_02.nii.gz")).dataobj)
    assert np.array_equal(label, (source_label > 0).astype(np.uint8))
    assert verify_dataset(folder) == []


def test_msd_rejects_3d_images_and_other_folders(tmp_path):
    rng = np.random.default_rng(6)
    image, label, affine = pair(rng, 0)
    save(tmp_path / "Task05_Prostate" / "imagesTr" / "prostate_00.nii.gz", image, affine)
    save(tmp_path / "Task05_Prostate" / "labelsTr" / "prostate_00.nii.gz", label, affine)
    with pytest.raises(DesamError, match=r"prostate_00\.nii\.gz: expected a 4D image"):
        run_msd(tmp_path / "Task05_Prostate", tmp_path / "raw")
    assert_nothing_published(tmp_path / "raw")
    with pytest.raises(DesamError, match="not an MSD Task05_Prostate folder"):
        run_msd(tmp_path / "Task05_Prostate" / "imagesTr", tmp_path / "raw")


def test_msd_cli_uses_raw_root_from_environment_and_full_name(tmp_path, monkeypatch, capsys):
    write_msd(tmp_path / "Task05_Prostate", {"0": "T2", "1": "ADC"}, np.random.default_rng(7))
    monkeypatch.setenv("DESAM_RAW", str(tmp_path / "raw"))
    with pytest.raises(SystemExit) as exit_info:
        convert_msd.main([str(tmp_path / "Task05_Prostate"), "-d", "Dataset012_MyMSD"])
    assert exit_info.value.code == 0
    assert "2 cases (MSD 2)" in capsys.readouterr().out
    assert verify_dataset(tmp_path / "raw" / "Dataset012_MyMSD") == []
