"""Exact predicted IoU of many prompts on ONE image, without a 4096 x 256 image-token state per prompt.

Grid inference asks PRIM for the IoU of k*k point prompts on the same slice. The dense path
(`net.prim(neck.expand(P, ...), points=...)`) carries every prompt's own copy of the N = 4096 image
tokens (C = 256 channels) through SAM's two-way transformer: about 1.3 G multiply-adds per prompt,
mostly N x 256 x 128 projections. This module computes the same numbers (same maths, float rounding
only) with about 150 M per prompt, none of it an N x C tensor per prompt.

Why it works. A prompt reaches the image tokens only through the image -> token attentions, whose
output for an image token is a softmax over the prompt's T (= 7) tokens in each of the H (= 8) heads:
sum_h A_h (v_h Wo_h^T) + b_o = A @ M + b_o, with A (N x H*T) the attention weights and M (H*T x C)
rows M[(t, h)] = v[t, h] @ Wo_h^T built from the prompt's 16-dim value vectors. So after one layer
the image tokens are LayerNorm(X0 + A M + b_o): the shared X0 (neck + dense "no mask" embedding) plus
a rank-56 update, then a per-row affine map. After layer l (row vectors, per prompt p, per token n):

    keys = c + s_l * (A_l R_l + s_{l-1} * (A_{l-1} R_{l-1} + ... + s_1 * (A_1 R_1 + Z)))

    Z (N x C), c (C,), S_m (H x d x C), e_m (C,): image-only, shared by all prompts;
    A_m (P x T*H x N) attention weights, s_m (P x N) LayerNorm scales, U_m (P x T x H x d) values:
    per prompt; rows R_m[(t, h)] = U_m[t, h] @ S_m[h] + e_m (T*H = 56 rows of C).

The steps, each exact:
1. Image -> token attention adds A M + b_o. Each head's weights sum to 1, so b_o and the constant c
   fold into the rows (e += (b_o + c) / H) and the level is (A, U = v, S = Wo^T by head).
2. LayerNorm of Y = a * Z + sum_m a_m A_m R_m (a_m = product of the later scales, a = a_1). Centring
   over channels is a right-multiplication by J = I - 11^T/C, applied once to the shared Z, S_m, e_m.
   |Yc|^2 = a^2 (|Zc|^2 + sum_m B_m . (G_mm B_m + 2 sum_{m' > m} G_mm' B_m' + 2 R_m Zc^T)) with
   B_m = a_m / a * A_m, G_mm' = R_m R_m'^T small Gram blocks per prompt, and R_m Zc^T = [U_m, 1] @
   [Zc S_m^T; Zc e_m] per head: an image-wide N x 17 factor times the prompt's 17-vectors. Then
   s = (|Yc|^2 / C + eps)^-1/2, and gamma * s * Yc + beta is again of the form: Z, S_m, e_m <-
   (centred) * gamma, c <- beta, one more scale.
3. Any projection Linear(keys [+ pe]) = W applied to that form: Z W^T, pe W^T, S_m W^T are image-wide
   (computed once per image), so per prompt the logits of a 16-dim query q per head are
   ((Z W^T)_h q) evaluated with the scales Horner-style: out = Zq; out = s_m * (out + A_m (R_m W_h^T q))
   for m = 1..l; out += (c W^T + pe W^T + b)_h q. That is one N x 16 GEMM per head and one N x 56 x 56
   GEMM per level. Token -> image attention (softmax over N) sums values the same way backwards.
4. Token-side work (self-attention, norms, MLP, projections of the 7 tokens) runs through SAM's own
   modules on (P, 7, C) tensors; the final token -> image attention only needs the IoU token's row.

Per prompt and image token that is seven 56 x 56 products (one per attention or LayerNorm that
touches a level, three for the second LayerNorm's Gram blocks) and eleven 56 x 16 products against
image-wide factors: about 37 k multiply-adds, 150 M per prompt. Per-prompt tensors are
laid out (P, T, H, N) so that each image-wide product is one GEMM per head and each per-prompt one a
single batched GEMM. The LayerNorm variance is an expanded square, yet in float32 the error against
a float64 reference is of the same order as the dense path's own float32 error (tests); float64
inputs give float64 results equal to the dense path's to about 1e-13.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from segment_anything.modeling.transformer import Attention, TwoWayTransformer
from torch import Tensor, nn

from desam_pipeline.network.prim import PRIM, Points


def _center(x: Tensor) -> Tensor:
    """Subtract the mean over the last (channel) axis: the right-multiplication by J = I - 11^T/C."""
    return x - x.mean(-1, keepdim=True)


def _per_head(x: Tensor, heads: int) -> Tensor:
    """(N, D) -> (H, d, N) contiguous: an image-wide GEMM factor per head."""
    return x.view(x.shape[0], heads, -1).permute(1, 2, 0).contiguous()


class _Basis:
    """The image-only part of the image tokens (Z, the level bases (S_m, e_m) and c of the module
    docstring), shared by every prompt, with its products with weights cached for every chunk of prompts."""

    def __init__(self, base: Tensor, levels: list[tuple[Tensor, Tensor]], const: Tensor | None) -> None:
        self.base, self.levels, self.const = base, levels, const    # (N, C), [((H, d, C), (C,))], (C,)
        self._cache: dict = {}

    def _cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def projection(self, linear: nn.Linear, pe: Tensor | None, heads: int):
        """(Z W^T, c W^T + pe W^T + b, [(S_m W^T, e_m W^T)]); the first two per head (H, d, N).

        Without pe the second is the constant c W^T + b, shape (D,).
        """
        def make():
            weight = linear.weight.T
            add = linear.bias if pe is None else pe @ weight + linear.bias
            if self.const is not None:
                add = add + self.const @ weight
            return (_per_head(self.base @ weight, heads), _per_head(add, heads) if add.dim() == 2 else add,
                    [(s @ weight, e @ weight) for s, e in self.levels])
        return self._cached(("projection", id(linear), pe is None), make)

    def with_level(self, out_proj: nn.Linear, heads: int) -> "_Basis":
        """The basis after an image -> token attention adds A @ M + b_o (b_o and c folded into the rows)."""
        def make():
            basis = out_proj.weight.T.reshape(heads, -1, out_proj.weight.shape[0])
            offset = out_proj.bias if self.const is None else out_proj.bias + self.const
            return _Basis(self.base, self.levels + [(basis, offset / heads)], None)
        return self._cached(("level", id(out_proj)), make)

    def normalized(self, norm: nn.LayerNorm):
        """(basis after `norm`, |Zc|^2 (N,), centred level bases, per level [Zc S_c^T; Zc e_c] (H, d + 1, N))."""
        def make():
            base = _center(self.base)
            levels = [(_center(s), _center(e)) for s, e in self.levels]
            cross = [torch.cat([torch.einsum("nc,hdc->hdn", base, s), (base @ e).expand(s.shape[0], 1, -1)], 1)
                     for s, e in levels]
            after = _Basis(base * norm.weight, [(s * norm.weight, e * norm.weight) for s, e in levels], norm.bias)
            return after, (base * base).sum(-1), levels, cross
        return self._cached(("norm", id(norm)), make)


@dataclass
class _Tokens:
    """Image tokens of a chunk of P prompts: the shared `basis`; per level the attention weights
    A (P, T*H, N) and value coordinates U (P, T, H, d); one scale s (P, N) per LayerNorm so far."""
    basis: _Basis
    weights: list[Tensor] = field(default_factory=list)
    coords: list[Tensor] = field(default_factory=list)
    scales: list[Tensor] = field(default_factory=list)


def _rows(coords: Tensor, basis: Tensor, offset: Tensor) -> Tensor:
    """(P, T*H, D): rows U[p, t, h] @ basis[h] + offset."""
    return torch.einsum("pthd,hde->pthe", coords, basis).flatten(1, 2) + offset


def _add_image_wide(out: Tensor, vectors: Tensor, shared: Tensor, alpha: float = 1.0, beta: float = 1.0) -> None:
    """out[p, t, h, :] = beta * out + alpha * vectors[p, t, h] @ shared[h], in place, one GEMM per head.

    out (P, T, H, N) contiguous, vectors (P, T, H, d), shared (H, d, N): for each head the (p, t) rows
    of `out` are evenly strided, so the GEMM writes straight into them.
    """
    prompts, tokens, heads, count = out.shape
    rows = out.view(prompts * tokens, heads, count)
    left = vectors.reshape(prompts * tokens, heads, -1)
    for h in range(heads):
        rows[:, h].addmm_(left[:, h], shared[h], beta=beta, alpha=alpha)


def _scores(image: _Tokens, linear: nn.Linear, pe: Tensor | None, queries: Tensor, heads: int) -> Tensor:
    """(P, T, H, N): per head, queries[p, t] . linear(image tokens [+ pe])[p, n] (step 3 of the docstring)."""
    base, add, levels = image.basis.projection(linear, pe, heads)
    prompts, tokens, width = queries.shape
    q = queries.view(prompts, tokens, heads, width // heads)
    out = queries.new_empty(prompts, tokens, heads, image.basis.base.shape[0])
    if not image.weights:
        _add_image_wide(out, q, base + add if add.dim() == 3 else base, beta=0.0)
    else:
        _add_image_wide(out, q, base, beta=0.0)
        flat = out.view(prompts, tokens * heads, -1)
        for weights, coords, scale, (basis, offset) in zip(image.weights, image.coords, image.scales, levels):
            rows = _rows(coords, basis, offset).view(prompts, -1, heads, width // heads)
            small = torch.einsum("pkhd,pthd->pthk", rows, q).reshape(prompts, tokens * heads, -1)
            flat.baddbmm_(small, weights).mul_(scale[:, None, :])
        if add.dim() == 3:
            _add_image_wide(out, q, add)
    if add.dim() == 1:
        out += torch.einsum("hd,pthd->pth", add.view(heads, -1), q)[..., None]
    return out


def _weighted_sum(image: _Tokens, linear: nn.Linear, weights: Tensor) -> Tensor:
    """(P, T, D): sum over n of weights[p, t, h, n] * linear(image tokens)[p, n, head h]."""
    prompts, tokens, heads, count = weights.shape
    base, add, levels = image.basis.projection(linear, None, heads)
    out = add.view(heads, -1).expand(prompts, tokens, heads, -1).clone()        # each row of weights sums to 1
    scaled = weights.view(prompts, tokens * heads, count)
    for m in reversed(range(len(image.weights))):                               # outermost scale first
        scale = image.scales[m][:, None, :]
        scaled = scaled * scale if m == len(image.weights) - 1 else scaled.mul_(scale)
        basis, offset = levels[m]
        rows = _rows(image.coords[m], basis, offset).view(prompts, -1, heads, out.shape[-1])
        mixed = torch.bmm(scaled, image.weights[m].transpose(1, 2)).view(prompts, tokens, heads, -1)
        out += torch.einsum("pthk,pkhd->pthd", mixed, rows)
    per_row = scaled.view(prompts * tokens, heads, count)
    for h in range(heads):
        out[:, :, h] += (per_row[:, h] @ base[h].T).view(prompts, tokens, -1)
    return out.flatten(2)


def _token_to_image(attention: Attention, queries: Tensor, image: _Tokens, pe: Tensor) -> Tensor:
    """`attention(q=queries, k=image tokens + pe, v=image tokens)` for every prompt: (P, T, C)."""
    heads = attention.num_heads
    q = attention.q_proj(queries)
    q = q * (1.0 / math.sqrt(q.shape[-1] // heads))
    weights = torch.softmax(_scores(image, attention.k_proj, pe, q, heads), dim=3)
    return attention.out_proj(_weighted_sum(image, attention.v_proj, weights))


def _image_to_token(attention: Attention, queries: Tensor, query_pe: Tensor, image: _Tokens,
                    pe: Tensor) -> _Tokens:
    """image tokens + `attention(q=image tokens + pe, k=queries + query_pe, v=queries)`: one more level."""
    heads = attention.num_heads
    k = attention.k_proj(queries + query_pe)
    k = k * (1.0 / math.sqrt(k.shape[-1] // heads))
    v = attention.v_proj(queries)
    prompts, tokens, width = v.shape
    weights = torch.softmax(_scores(image, attention.q_proj, pe, k, heads), dim=1)   # over each head's tokens
    return _Tokens(image.basis.with_level(attention.out_proj, heads),
                   image.weights + [weights.view(prompts, tokens * heads, -1)],
                   image.coords + [v.view(prompts, tokens, heads, -1)], image.scales)


def _layer_norm(image: _Tokens, norm: nn.LayerNorm) -> _Tokens:
    """`norm` over channels of every prompt's image tokens (step 2 of the docstring): one more scale."""
    after, base_square, levels, cross = image.basis.normalized(norm)
    count, channels = image.basis.base.shape
    blocks, inverse = [image.weights[0]], None       # B_m = A_m / (product of the scales before level m)
    for weights, scale in zip(image.weights[1:], image.scales):
        inverse = 1.0 / scale if inverse is None else inverse / scale
        blocks.append(weights * inverse[:, None, :])
    rows = [_rows(u, s, e) for u, (s, e) in zip(image.coords, levels)]
    square = base_square
    for m, (coords, products) in enumerate(zip(image.coords, cross)):
        # B_m . (G_mm B_m + 2 sum_{m' > m} G_mm' B_m' + 2 R_m Zc^T): each Gram block used once
        terms = torch.bmm(torch.bmm(rows[m], rows[m].transpose(1, 2)), blocks[m])
        for later in range(m + 1, len(rows)):
            terms.baddbmm_(torch.bmm(rows[m], rows[later].transpose(1, 2)), blocks[later], alpha=2.0)
        prompts, tokens, heads = coords.shape[:3]
        augmented = torch.cat([coords, coords.new_ones(prompts, tokens, heads, 1)], dim=3)
        _add_image_wide(terms.view(prompts, tokens, heads, count), augmented, products, alpha=2.0)
        square = terms.mul_(blocks[m]).sum(1).add_(square)
    if image.scales:
        leading = image.scales[0]
        for scale in image.scales[1:]:
            leading = leading * scale
        square.mul_(leading.square())
    scale = torch.rsqrt(square / channels + norm.eps)
    return _Tokens(after, image.weights, image.coords, image.scales + [scale])


@torch.no_grad()
def iou_token_outputs(transformer: TwoWayTransformer, image: Tensor, image_pe: Tensor, tokens: Tensor,
                      chunk: int = 81) -> Tensor:
    """The final IoU-token output (P, C) of `transformer(image, image_pe, tokens)` (its `[0][:, 0]`) for P
    prompt token sets on ONE image.

    image, image_pe: (1, C, h, w) or (C, h, w); tokens: (P, T, C), IoU token first. Prompts go
    `chunk` at a time (about 5 MB per prompt of a chunk in float32 at 64 x 64); image-only products
    are computed once. Runs in the dtype of its inputs, on their device, without autograd.
    """
    channels = tokens.shape[-1]
    start_basis = _Basis(image.reshape(channels, -1).T.contiguous(), [], None)
    pe = image_pe.reshape(channels, -1).T.contiguous()
    outputs = []
    for start in range(0, tokens.shape[0], chunk):
        point_embedding = tokens[start:start + chunk]
        queries = point_embedding
        keys = _Tokens(start_basis)
        for layer in transformer.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + point_embedding
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            queries = queries + _token_to_image(layer.cross_attn_token_to_image, queries + point_embedding,
                                                keys, pe)
            queries = layer.norm2(queries)
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = _image_to_token(layer.cross_attn_image_to_token, queries, point_embedding, keys, pe)
            keys = _layer_norm(keys, layer.norm4)
        first = queries[:, :1]
        attended = _token_to_image(transformer.final_attn_token_to_image, first + point_embedding[:, :1],
                                   keys, pe)
        outputs.append(transformer.norm_final_attn(first + attended)[:, 0])
    return torch.cat(outputs)


@torch.no_grad()
def prompt_ious(model: nn.Module, neck: Tensor, points: Points | None = None, boxes: Tensor | None = None,
                chunk: int = 81) -> Tensor:
    """Predicted IoU (P,) of P prompts on ONE image, equal to `model.prim(neck.expand(P, -1, -1, -1),
    points, boxes)[1][:, 0]` up to float rounding, at a fraction of its cost.

    model: a DeSAM or its PRIM; neck: (1, 256, 64, 64) or (256, 64, 64); points (coords (P, n, 2)
    as (x, y), labels (P, n)) and/or boxes (P, 4), in the network's prompt frame (`prim.frame`: 1024 for
    SAM's ViT, 256 for LiteMedSAM), as for PRIM. Autocast is switched off inside: it runs in the decoder's
    dtype (float32) on the neck's device.
    """
    prim: PRIM = getattr(model, "prim", model)
    decoder = prim.mask_decoder
    dtype = decoder.iou_token.weight.dtype
    sparse, dense, image_pe = prim.encode_prompts(points, boxes, neck.device)
    with torch.autocast(device_type=neck.device.type, enabled=False):
        image = neck.reshape(1, *dense.shape[1:]).to(dtype) + dense[:1].to(dtype)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.expand(sparse.shape[0], -1, -1), sparse.to(dtype)], dim=1)
        outputs = iou_token_outputs(decoder.transformer, image, image_pe.to(dtype), tokens, chunk)
        return decoder.iou_prediction_head(outputs)[:, 0]
