"""Tree roots, dataset naming, atomic writes, SAM builders and the SamPredictor-equivalent preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor
from segment_anything.build_sam import sam_model_registry

from desam_pipeline.data import dataset_checks, preprocessing
from desam_pipeline.io.atomic import atomic_path
from desam_pipeline.network import encoders, sam_models
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.paths import Trees, get_root, resolve_dataset


def test_missing_root_variable_is_named(monkeypatch):
    monkeypatch.delenv("DESAM_RESULTS", raising=False)
    with pytest.raises(DesamError, match="DESAM_RESULTS is not set"):
        get_root("results")
    assert str(get_root("results", "/x")) == "/x"


def test_dataset_by_number_or_name(toy_dataset, trees):
    assert resolve_dataset("900", trees["raw"]) == "Dataset900_Toy"
    assert resolve_dataset(900, trees["raw"]) == "Dataset900_Toy"
    assert Trees("Dataset900_Toy").raw == toy_dataset
    with pytest.raises(DesamError, match="no dataset with number 901 .*convert one first .*-d 901"):
        Trees(901)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole", encoding="utf-8")
    assert target.read_text(encoding="utf-8") == "whole" and list(tmp_path.iterdir()) == [target]


def test_tiny_sam_keeps_real_geometry(tiny_checkpoint):
    encoder = encoders.load_image_encoder("tiny", tiny_checkpoint)
    assert sam_models.tap_indices(encoder) == [1, 3, 5]
    assert encoders.feature_shapes(encoder) == {"neck": (256, 64, 64), **{f"tap{k}": (32, 64, 64) for k in range(3)}}
    assert encoder.img_size == 1024 and encoder.patch_embed.proj.stride == (16, 16)
    with torch.no_grad():
        out = encoder(torch.zeros(1, 3, 1024, 1024))
    assert out.shape == (1, 256, 64, 64)


def test_tap_indices_of_real_variants_follow_their_config():
    # Build vit_b (the cheapest real one) and read the indices off its blocks.
    sam = sam_model_registry["vit_b"](None)
    assert sam_models.tap_indices(sam.image_encoder) == [2, 5, 8]


def test_checkpoint_variant_mismatch_is_one_line(tiny_checkpoint, tmp_path):
    with pytest.raises(DesamError) as info:
        encoders.load_image_encoder("vit_b", tiny_checkpoint)
    assert "sam_tiny.pth: a tiny checkpoint, not vit_b" in str(info.value) and "\n" not in str(info.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DesamError, match="not a readable PyTorch checkpoint"):
        sam_models.read_state_dict(junk)
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DesamError, match="not a SAM checkpoint"):
        sam_models.read_state_dict(tmp_path / "other.pth")
    assert sam_models.detect_encoder(sam_models.read_state_dict(tiny_checkpoint)) == "tiny"


@pytest.mark.slow
def test_sam_input_equals_sam_predictor(tiny_checkpoint):
    sam = sam_models.build_sam("tiny")
    sam.load_state_dict(torch.load(tiny_checkpoint, weights_only=True))
    rng = np.random.default_rng(1)
    slices = rng.integers(0, 256, size=(2, 256, 256), dtype=np.uint8)
    with torch.no_grad():
        ours = sam.image_encoder(encoders.sam_input(slices, "cpu", sam.image_encoder.img_size))
    for i, img in enumerate(slices):
        predictor = SamPredictor(sam)
        predictor.set_image(np.repeat(img[..., None], 3, axis=-1))
        torch.testing.assert_close(ours[i:i + 1], predictor.get_image_embedding(), rtol=0, atol=1e-5)


def test_intensity_scaling_keeps_zeros_and_range():
    volume = np.zeros((10, 10, 4), np.float32)
    volume[2:8, 2:8] = np.linspace(1, 1000, 144).reshape(6, 6, 4)
    out = preprocessing.intensity_to_uint8(volume)
    assert out.dtype == np.uint8 and out.max() == 255
    assert np.all(out[volume == 0] == 0)
    label = preprocessing.resize_label_slices(np.zeros((1, 30, 20)) + (np.arange(20) > 9))
    assert set(np.unique(label)) == {0, 1} and label.shape == (1, 256, 256)


def test_verify_reports_each_problem(toy_dataset):
    assert dataset_checks.verify_dataset(toy_dataset) == []
    (toy_dataset / "labelsTr" / "SiteA_Case00.nii.gz").unlink()
    (toy_dataset / "imagesTr" / "SiteB_Case01_0000.nii.gz").write_bytes(b"\x1f\x8bcorrupt")
    problems = dataset_checks.verify_dataset(toy_dataset)
    assert any("SiteA_Case00.nii.gz: label missing" in p for p in problems)
    assert any("SiteB_Case01_0000.nii.gz: cannot read" in p for p in problems)
    with pytest.raises(DesamError, match="invalid dataset"):
        dataset_checks.require_valid_dataset(toy_dataset)
