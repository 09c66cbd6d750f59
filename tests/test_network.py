"""DeSAM network: equivalence of PRIM with SAM's decoder, strict loading, shapes, gradients, state round trip."""
from __future__ import annotations

import pytest
import torch

from desam_pipeline.network import DeSAM, sam_models
from desam_pipeline.network.pdmm import PDMM, SqueezeExcitation
from desam_pipeline.utilities.errors import DesamError

from reference_layout import PIMMDecoder

WIDTHS = [sam_models.encoder_width(e) for e in sam_models.ENCODERS]


def vit_taps(width: int) -> list[list[int]]:
    """Tap shapes of a SAM ViT of this width: three maps on the 64x64 grid."""
    return [[width, 64, 64]] * 3


@pytest.fixture(scope="module")
def tiny_net(tiny_checkpoint) -> DeSAM:
    return DeSAM.from_sam_checkpoint(tiny_checkpoint, "tiny", vit_taps(32)).eval()


@pytest.fixture(scope="module")
def tiny_sam(tiny_checkpoint):
    sam = sam_models.build_sam("tiny")
    sam.load_state_dict(torch.load(tiny_checkpoint, weights_only=True))
    return sam.eval()


def _prompts(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.rand(batch, 3, 2, generator=gen) * 1024
    labels = torch.randint(0, 2, (batch, 3), generator=gen)
    corner = torch.rand(batch, 2, generator=gen) * 500
    boxes = torch.cat([corner, corner + 100 + torch.rand(batch, 2, generator=gen) * 400], dim=1)
    return (coords, labels), boxes


def _sam_reference(sam, neck, points, boxes):
    """SAM's own decoder, one image at a time: (IoU column 0, transformer image tokens as (1,256,64,64))."""
    captured = {}
    hook = sam.mask_decoder.transformer.register_forward_hook(
        lambda module, args, out: captured.__setitem__("src", out[1]))
    ious, embeddings = [], []
    try:
        for i in range(neck.shape[0]):
            sparse, dense = sam.prompt_encoder(
                points=None if points is None else (points[0][i:i + 1], points[1][i:i + 1]),
                boxes=None if boxes is None else boxes[i:i + 1], masks=None)
            _, iou = sam.mask_decoder(image_embeddings=neck[i:i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                                      sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                      multimask_output=False)
            ious.append(iou)
            embeddings.append(captured["src"].transpose(1, 2).reshape(1, 256, 64, 64))
    finally:
        hook.remove()
    return torch.cat(ious), torch.cat(embeddings)


@pytest.mark.parametrize("prompt", ["points", "boxes", "points+boxes"])
def test_prim_equals_sam_decoder_per_image(tiny_net, tiny_sam, prompt):
    batch = 3
    neck = torch.randn(batch, 256, 64, 64, generator=torch.Generator().manual_seed(1))
    points, boxes = _prompts(batch, seed=2)
    points = points if "points" in prompt else None
    boxes = boxes if "boxes" in prompt else None
    with torch.no_grad():
        embedding, iou = tiny_net.prim(neck, points=points, boxes=boxes)
        ref_iou, ref_embedding = _sam_reference(tiny_sam, neck, points, boxes)
    assert iou.shape == (batch, 1) and embedding.shape == (batch, 256, 64, 64)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=0)
    torch.testing.assert_close(embedding, ref_embedding, atol=1e-5, rtol=0)
    # The prompts matter: different images' prompts give different IoUs.
    assert iou.std() > 0


def test_loading_is_strict_and_names_the_problem(tiny_checkpoint, tmp_path):
    with pytest.raises(DesamError, match=r"sam_tiny\.pth: a tiny checkpoint, but encoder vit_b"):
        DeSAM.from_sam_checkpoint(tiny_checkpoint, "vit_b", vit_taps(32))
    with pytest.raises(DesamError, match="unknown encoder"):
        DeSAM.from_sam_checkpoint(tiny_checkpoint, "vit_x", vit_taps(32))

    other = tmp_path / "other.pth"
    torch.save({"backbone.weight": torch.zeros(3)}, other)
    with pytest.raises(DesamError, match=r"other\.pth: not a SAM checkpoint"):
        DeSAM.from_sam_checkpoint(other, "tiny", vit_taps(32))
    text = tmp_path / "notes.pth"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(DesamError, match=r"notes\.pth: not a readable PyTorch checkpoint"):
        DeSAM.from_sam_checkpoint(text, "tiny", vit_taps(32))

    state = torch.load(tiny_checkpoint, weights_only=True)
    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in state.items() if k != "mask_decoder.iou_token.weight"}, broken)
    with pytest.raises(DesamError) as info:
        DeSAM.from_sam_checkpoint(broken, "tiny", vit_taps(32))
    message = str(info.value)
    assert "broken.pth" in message and "mask_decoder.iou_token.weight" in message and "\n" not in message


def test_unused_decoder_heads_may_be_absent(tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    lean = {k: v for k, v in state.items()
            if not k.startswith(("mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps"))}
    assert len(lean) < len(state)
    path = tmp_path / "lean.pth"
    torch.save(lean, path)
    net = DeSAM.from_sam_checkpoint(path, "tiny", vit_taps(32))
    own = net.prim.state_dict()
    for key in ("mask_decoder.iou_token.weight", "mask_decoder.transformer.layers.0.mlp.lin1.weight",
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"):
        assert torch.equal(own[key], state[key])


@pytest.mark.parametrize("width", WIDTHS)
def test_output_shapes_for_every_encoder_width(width):
    net = DeSAM.for_encoder("tiny", vit_taps(width)).eval()
    batch = 2 if width < 256 else 1  # the real widths cost ~25 GFLOP per sample on CPU
    neck = torch.randn(batch, 256, 64, 64)
    taps = [torch.randn(batch, width, 64, 64) for _ in range(3)]
    with torch.no_grad():
        logits, iou = net(neck, taps, boxes=torch.tensor([[0.0, 0, 1024, 1024]] * batch))
    assert logits.shape == (batch, 1, 256, 256) and iou.shape == (batch, 1)
    assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="3 taps of shapes"):
        net.pdmm([t[:, :16] for t in taps], torch.zeros(batch, 256, 64, 64))


def test_parameter_counts():
    counts = DeSAM.for_encoder("vit_h", vit_taps(sam_models.encoder_width("vit_h"))).parameter_counts()
    print("DeSAM vit_h parameters:", counts)
    # PRIM is segment_anything's own prompt encoder and mask decoder minus the two heads it does not use
    # (SAM's decoder is the same for every variant: 4,058,340 parameters, 6,220 in the prompt encoder).
    sam = sam_models.build_sam("tiny", seed=0)

    def size(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    unused = size(sam.mask_decoder.output_upscaling) + size(sam.mask_decoder.output_hypernetworks_mlps)
    assert (size(sam.prompt_encoder), size(sam.mask_decoder), unused) == (6_220, 4_058_340, 633_184)
    assert counts["prim.prompt_encoder"] == size(sam.prompt_encoder) == 6_220
    assert counts["prim.mask_decoder"] == size(sam.mask_decoder) - unused == 3_425_156
    assert 9e6 < counts["pdmm"] < 11e6  # "about 10 M" in the paper
    assert counts["total"] == 6_220 + 3_425_156 + counts["pdmm"]
    assert counts["trainable"] == 3_425_156 + counts["pdmm"]  # the prompt encoder is frozen


@pytest.mark.slow
def test_gradients_reach_prim_and_pdmm_but_not_the_prompt_encoder(tiny_net):
    net = DeSAM.from_inference_state(tiny_net.inference_state_dict(), tiny_net.config).train()
    assert not net.prim.prompt_encoder.training and net.prim.mask_decoder.training
    neck = torch.randn(2, 256, 64, 64)
    taps = [torch.randn(2, 32, 64, 64) for _ in range(3)]
    points = (torch.tensor([[[100.0, 200.0]], [[600.0, 50.0]]]), torch.ones(2, 1, dtype=torch.int64))
    logits, iou = net(neck, taps, points=points)
    (logits.mean() + iou.sum()).backward()
    for name, module in (("prim", net.prim.mask_decoder), ("pdmm", net.pdmm)):
        for pname, param in module.named_parameters():
            assert param.grad is not None, f"{name}.{pname} is not in the graph"
            # The squeeze of an SE block after a non-affine InstanceNorm is the channel mean of a
            # normalised map, i.e. 0, so the desam layout's gate is the constant sigmoid(W2 relu(b1) + b2):
            # only its output bias is sure to learn (see pdmm.py).
            if ".se.gate." not in pname or pname.endswith("se.gate.2.bias"):
                assert param.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    for param in net.prim.prompt_encoder.parameters():
        assert not param.requires_grad and param.grad is None


def test_inference_state_round_trip(tiny_net, tmp_path):
    state = tiny_net.inference_state_dict()
    assert {k.split(".")[0] for k in state} == {"prim", "pdmm"}
    assert any(k.startswith("prim.prompt_encoder.") for k in state)
    assert not any("image_encoder" in k or "output_upscaling" in k for k in state)
    path = tmp_path / "state.pth"
    torch.save(state, path)
    loaded = DeSAM.from_inference_state(torch.load(path, weights_only=True), tiny_net.config).eval()
    neck = torch.randn(1, 256, 64, 64)
    taps = [torch.randn(1, 32, 64, 64) for _ in range(3)]
    boxes = torch.tensor([[0.0, 0, 1024, 1024]])
    with torch.no_grad():
        for a, b in zip(tiny_net(neck, taps, boxes=boxes), loaded(neck, taps, boxes=boxes)):
            assert torch.equal(a, b)
    with pytest.raises(DesamError, match=r"state.pth: not a DeSAM state for taps \[\[768, 64, 64\]"):
        DeSAM.from_inference_state(state, {**tiny_net.config, "tap_shapes": vit_taps(768)}, source=path)


def test_norm_is_configurable():
    net = DeSAM.for_encoder("tiny", vit_taps(32), norm="batch", norm_affine=True)
    norms = [m for m in net.pdmm.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.affine for m in norms)
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in net.pdmm.modules())
    default = [m for m in DeSAM.for_encoder("tiny", vit_taps(32)).pdmm.modules() if isinstance(m, torch.nn.InstanceNorm2d)]
    assert default and not any(m.affine for m in default)
    with pytest.raises(DesamError, match="unknown PDMM norm 'layer'"):
        DeSAM.for_encoder("tiny", vit_taps(32), norm="layer")


REFERENCE_PDMM_PARAMETERS = {"vit_h": 9_732_160, "vit_b": 7_438_400}


@pytest.mark.parametrize("encoder", sorted(REFERENCE_PDMM_PARAMETERS))
def test_reference_pdmm_has_the_reference_parameter_count(encoder):
    """The reference's "used" PDMM parameters are those its forward path trains: a backward pass through the
    reference layout (test builder, reference names) reaches all but the 1x1 residual convolutions of the
    blocks whose channels do not change and the first up-block's head, which deep supervision alone returns."""
    width = sam_models.encoder_width(encoder)
    pdmm = DeSAM.for_encoder(encoder, vit_taps(width), pdmm="reference").pdmm
    built = sum(p.numel() for p in pdmm.parameters())
    reference = PIMMDecoder(width)
    grid = 4  # the same parameters at any grid; the real 64 costs seconds per pass on CPU
    taps = [torch.randn(1, width, grid, grid) for _ in range(3)]
    reference(torch.randn(1, 256, grid, grid), taps).sum().backward()
    used = {name: p.numel() for name, p in reference.named_parameters() if p.grad is not None}
    unused = {name for name, p in reference.named_parameters() if p.grad is None}
    assert unused == {"seg_outputs.0.weight"} | {
        f"{prefix}.conv3.conv.weight" for prefix in
        ("conv_blocks_context.1.residual_block.0.1", "conv_blocks_context.2.residual_block.0.1",
         "conv_blocks_context.2.residual_block.1.1")}
    assert built == sum(used.values()) == REFERENCE_PDMM_PARAMETERS[encoder]
    desam_layout = sum(p.numel() for p in DeSAM.for_encoder(encoder, vit_taps(width)).pdmm.parameters())
    se_biases = sum(m.gate[0].out_features + m.gate[2].out_features
                    for m in pdmm.modules() if isinstance(m, SqueezeExcitation))
    assert desam_layout == built + se_biases + 1  # + the head's bias


def _gates(pdmm: PDMM, taps, embedding) -> list[torch.Tensor]:
    gates = []
    hooks = [m.gate.register_forward_hook(lambda _m, _i, out: gates.append(out.detach()))
             for m in pdmm.modules() if isinstance(m, SqueezeExcitation)]
    with torch.no_grad():
        pdmm(taps, embedding)
    for hook in hooks:
        hook.remove()
    return gates


def test_reference_se_gate_is_exactly_one_half_after_a_non_affine_instance_norm():
    torch.manual_seed(0)
    shapes = [[32, 16, 16]] * 3
    taps = [torch.randn(2, *shape) * 5 + 3 for shape in shapes]
    embedding = torch.randn(2, 256, 16, 16)
    reference = PDMM(shapes, 16, layout="reference")
    gates = _gates(reference, taps, embedding)
    assert len(gates) == 9 and all(torch.equal(g, torch.full_like(g, 0.5)) for g in gates)
    # The gate's weights get only rounding noise as gradient: its input is the mean of a normalised map.
    reference(taps, embedding).sum().backward()
    se = [p.grad.abs().max() for n, p in reference.named_parameters() if ".se.gate." in n]
    conv = [p.grad.abs().max() for n, p in reference.named_parameters() if "conv2" in n]
    assert max(se) < 1e-5 * min(conv)
    # The desam layout's biases make it a per-channel constant other than 0.5, the same for every input.
    torch.manual_seed(0)
    desam = PDMM(shapes, 16, layout="desam")
    gates = _gates(desam, taps, embedding)
    assert not all(torch.equal(g, torch.full_like(g, 0.5)) for g in gates)
    assert all(torch.allclose(g[0], g[1], atol=1e-6) for g in gates)
    with pytest.raises(DesamError, match="unknown PDMM layout 'unet'"):
        PDMM(shapes, 16, layout="unet")


def test_pdmm_layout_is_recorded_and_rebuilt(tiny_checkpoint):
    net = DeSAM.from_sam_checkpoint(tiny_checkpoint, "tiny", vit_taps(32), pdmm="reference")
    assert net.config["pdmm"] == "reference" and net.pdmm.head.bias is None
    state = net.inference_state_dict()
    assert not any(k.startswith("pdmm.") and ".se.gate." in k and k.endswith("bias") for k in state)
    assert DeSAM.from_inference_state(state, net.config).config["pdmm"] == "reference"
    old_config = {k: v for k, v in net.config.items() if k != "pdmm"}  # written before the option: desam
    with pytest.raises(DesamError, match="'desam' PDMM layout .* missing"):
        DeSAM.from_inference_state(state, old_config)
