"""The phantom: deterministic per seed, SAML layout that converts and verifies, and a real site shift."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dataset_conversion import make_phantom as phantom_cli
from dataset_conversion.convert_prostate_multisite import convert_prostate_multisite
from dataset_conversion.make_phantom import SITE_ORDER, generate_case, make_phantom
from dataset_conversion.phantom_sites import SITES
from desam_pipeline.data import raw_dataset
from desam_pipeline.data.dataset_checks import verify_dataset
from desam_pipeline.data.preprocessing import intensity_to_uint8
from desam_pipeline.utilities.errors import DesamError


CASES_PER_SITE = 2
ENDORECTAL = {"BMC", "BIDMC", "HK"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return make_phantom(tmp_path_factory.mktemp("phantom") / "saml", CASES_PER_SITE, seed=0)


@pytest.fixture(scope="module")
def converted(phantom, tmp_path_factory) -> Path:
    return convert_prostate_multisite(phantom, tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def cases(converted) -> dict[str, list[dict]]:
    """Per site: image as uint8 (the pipeline's own intensity step), binary label, spacing."""
    meta = raw_dataset.load_dataset_json(converted)
    per_site: dict[str, list[dict]] = {}
    for case, site in raw_dataset.domains(meta).items():
        image = nib.load(str(raw_dataset.image_path(converted, case, meta)))
        label = np.asanyarray(nib.load(str(raw_dataset.label_path(converted, case, meta))).dataobj) > 0
        per_site.setdefault(site, []).append({
            "uint8": intensity_to_uint8(image.get_fdata(dtype=np.float32)), "label": label,
            "spacing": tuple(float(z) for z in image.header.get_zooms()[:3]),
        })
    return per_site


@pytest.mark.slow
def test_same_seed_same_voxels_and_cases_independent_of_the_rest(phantom):
    first, again = generate_case("I2CVB", 1, seed=0), generate_case("I2CVB", 1, seed=0)
    assert first.image.tobytes() == again.image.tobytes() and first.label.tobytes() == again.label.tobytes()
    assert np.array_equal(first.affine, again.affine)
    other_seed = generate_case("I2CVB", 1, seed=1)
    assert other_seed.image.shape != first.image.shape or not np.array_equal(other_seed.image, first.image)
    written = nib.load(str(phantom / "I2CVB" / "Case01.nii.gz"))
    assert np.array_equal(np.asanyarray(written.dataobj), first.image)
    assert np.array_equal(written.affine, first.affine)


@pytest.mark.slow
def test_saml_layout_with_the_real_quirks(phantom):
    assert sorted(p.name for p in phantom.iterdir()) == sorted([*SITE_ORDER, "phantom.json"])
    assert sorted(p.name for p in (phantom / "BMC").iterdir()) == [
        "Case00.nii.gz", "Case00_Segmentation.nii.gz", "Case01.nii.gz", "Case01_Segmentation.nii.gz"]
    assert sorted(p.name for p in (phantom / "UCL").iterdir() if "seg" not in p.name) == [
        "Case01.nii.gz", "Case26.nii.gz"]
    assert sorted(p.name for p in (phantom / "HK").iterdir() if "seg" not in p.name) == [
        "Case38.nii.gz", "Case39.nii.gz"]
    for site in SITE_ORDER:
        label = np.asanyarray(nib.load(str(next((phantom / site).glob("*egmentation.nii.gz")))).dataobj)
        assert set(np.unique(label).tolist()) == ({0, 1, 2} if site in ("RUNMC", "BMC") else {0, 1})
        image = nib.load(str(phantom / site / ("Case38.nii.gz" if site == "HK" else "Case01.nii.gz")))
        assert image.get_data_dtype() == np.dtype(SITES[site].dtype)
    info = json.loads((phantom / "phantom.json").read_text(encoding="utf-8"))
    assert info["seed"] == 0 and len(info["cases"]) == len(SITE_ORDER) * CASES_PER_SITE


@pytest.mark.slow
def test_converted_phantom_passes_verification(converted):
    assert verify_dataset(converted) == []
    meta = raw_dataset.load_dataset_json(converted)
    assert sorted(set(raw_dataset.domains(meta).values())) == sorted(SITE_ORDER)
    assert meta["numTraining"] == len(SITE_ORDER) * CASES_PER_SITE


@pytest.mark.slow
def test_labels_are_plausible_at_every_site(cases):
    for site, items in cases.items():
        for item in items:
            label, spacing = item["label"], item["spacing"]
            volume_ml = label.sum() * np.prod(spacing) / 1000.0
            assert 10.0 <= volume_ml <= 100.0, (site, volume_ml)
            slices = np.nonzero(label.any(axis=(0, 1)))[0]
            assert slices.size == slices[-1] - slices[0] + 1  # one connected run of slices
            assert 6 <= slices.size <= 40 and slices[0] > 0 and slices[-1] < label.shape[2] - 1
            assert not label[[0, -1]].any() and not label[:, [0, -1]].any()  # not cut by the field of view


@pytest.mark.slow
def test_sites_differ_in_geometry(cases):
    spacing = {site: items[0]["spacing"] for site, items in cases.items()}
    assert len({s[0] for s in spacing.values()}) >= 4
    assert spacing["I2CVB"][2] < 0.5 * min(s[2] for site, s in spacing.items() if site != "I2CVB")
    assert spacing["BIDMC"][0] == min(s[0] for s in spacing.values())

    def apparent_size(item):  # largest prostate cross-section as a fraction of the slice
        return item["label"].sum(axis=(0, 1)).max() / np.prod(item["label"].shape[:2])

    size = {site: np.mean([apparent_size(i) for i in items]) for site, items in cases.items()}
    assert size["BIDMC"] > 2 * size["RUNMC"]


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """1-D earth mover's distance between two samples, in grey levels."""
    q = np.linspace(0, 1, 101)
    return float(np.mean(np.abs(np.quantile(a, q) - np.quantile(b, q))))


@pytest.mark.slow
def test_prostate_intensities_shift_between_sites_more_than_within(cases):
    """After the pipeline's own uint8 normalisation, sites differ more than cases of one site do."""
    samples = [(site, item["uint8"][item["label"]].astype(float)) for site, items in cases.items() for item in items]
    within, between = [], []
    for (site_a, a), (site_b, b) in itertools.combinations(samples, 2):
        (within if site_a == site_b else between).append(wasserstein(a, b))
    assert np.mean(between) > 2 * np.mean(within)
    site_means = {site: np.mean([item["uint8"][item["label"]].mean() for item in items])
                  for site, items in cases.items()}
    assert max(site_means.values()) - min(site_means.values()) > 40


@pytest.mark.slow
def test_endorectal_coil_brightens_the_posterior_gland(cases):
    """Posterior-third / anterior-third prostate brightness is higher at every endorectal-coil site."""
    def ratio(item):
        label = item["label"]
        rows = np.nonzero(label.any(axis=(0, 2)))[0]  # axis 1 runs from anterior to posterior
        third = (rows[-1] - rows[0]) / 3
        index = np.arange(label.shape[1])[None, :, None]
        anterior, posterior = label & (index <= rows[0] + third), label & (index >= rows[-1] - third)
        return item["uint8"][posterior].mean() / item["uint8"][anterior].mean()

    site_ratio = {site: np.mean([ratio(i) for i in items]) for site, items in cases.items()}
    assert min(site_ratio[s] for s in ENDORECTAL) > max(r for s, r in site_ratio.items() if s not in ENDORECTAL)


def test_cli_writes_requested_sites_and_refuses_a_full_folder(tmp_path, capsys):
    out = tmp_path / "phantom"
    with pytest.raises(SystemExit) as exit_info:
        phantom_cli.main([str(out), "--cases-per-site", "1", "--seed", "3", "--sites", "HK", "UCL"])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in out.iterdir()) == ["HK", "UCL", "phantom.json"]
    written = np.asanyarray(nib.load(str(out / "HK" / "Case38.nii.gz")).dataobj)
    assert np.array_equal(written, generate_case("HK", 38, seed=3).image)
    with pytest.raises(DesamError, match="already exists"):
        make_phantom(out, 1, 3, ["HK"])
    with pytest.raises(DesamError, match="unknown phantom site"):
        make_phantom(tmp_path / "other", 1, 0, ["XYZ"])
