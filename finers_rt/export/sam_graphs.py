"""Export-only torch wrappers of a segment-anything `Sam` and their ONNX export.

`SamEncoderGraph`: preprocessed image `[1, 3, S, S]` -> `image_embeddings [1, C, E, E]`.
`SamDecoderGraph`: the official segment-anything ONNX decoder interface, branch-free, returning
ALL `M = num_multimask_outputs + 1` masks (index 0 = the single-mask output). Unlike
`segment_anything.utils.onnx.SamOnnxModel`, the crop of the padded mask to the resized image
size is computed from tensor VALUES of `orig_im_size` (the library's `int()` is frozen by
tracing, so a decoder traced at one image size crops wrongly at another).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("image_embeddings",)
DECODER_INPUTS = ("image_embeddings", "point_coords", "point_labels", "mask_input",
                  "has_mask_input", "orig_im_size")
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
OPSET = 17


class SamEncoderGraph(nn.Module):
    """image `[1, 3, S, S]` float32 (normalised, zero-padded) -> `[1, C, S/16, S/16]`."""

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.image_encoder = sam.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class SamDecoderGraph(nn.Module):
    """Prompt encoder + mask decoder + mask post-processing of a `Sam`, traceable.

    Inputs: image_embeddings `[1, C, E, E]`; point_coords `[1, N, 2]` xy in the resized
    (S-long-side) frame; point_labels `[1, N]` float (1 fg, 0 bg, 2/3 box corners, -1 pad);
    mask_input `[1, 1, 4E, 4E]`; has_mask_input `[1]`; orig_im_size `[2]` float (h, w).
    Outputs: masks `[1, M, h, w]` logits at the original size, iou_predictions `[1, M]`,
    low_res_masks `[1, M, 4E, 4E]`.
    """

    def __init__(self, sam: nn.Module):
        super().__init__()
        self.sam = sam
        self.img_size = int(sam.image_encoder.img_size)

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """Sparse prompt embeddings `[1, N, C]`, label-selected without control flow."""
        prompt = self.sam.prompt_encoder
        coords = (point_coords + 0.5) / self.img_size  # pixel centres, normalised to [0, 1]
        embedding = prompt.pe_layer._pe_encoding(coords)  # [1, N, C]
        labels = point_labels.unsqueeze(-1)  # [1, N, 1]
        embedding = embedding * (labels != -1) + prompt.not_a_point_embed.weight * (labels == -1)
        for i in range(prompt.num_point_embeddings):
            embedding = embedding + prompt.point_embeddings[i].weight * (labels == i)
        return embedding

    def embed_mask(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        """Dense prompt embedding `[1, C, E, E]` (mask downscaling or the no-mask embedding)."""
        prompt = self.sam.prompt_encoder
        no_mask = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return has_mask_input * prompt.mask_downscaling(mask_input) + (1 - has_mask_input) * no_mask

    def upscale_masks(self, low_res: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """`[1, M, 4E, 4E]` -> `[1, M, h, w]` exactly as `Sam.postprocess_masks`.

        The resized (pre-padding) size is `floor(side * S / max(h, w) + 0.5)` in float64, the
        same arithmetic as `ResizeLongestSide.get_preprocess_shape`, kept as tensors.
        """
        masks = F.interpolate(low_res, size=(self.img_size, self.img_size), mode="bilinear",
                              align_corners=False)
        size_hw = orig_im_size.to(torch.float64)
        scale = self.img_size / torch.max(size_hw)
        resized_hw = torch.floor(size_hw * scale + 0.5).to(torch.int64)
        rows = torch.arange(resized_hw[0], dtype=torch.int64)
        cols = torch.arange(resized_hw[1], dtype=torch.int64)
        masks = torch.index_select(torch.index_select(masks, 2, rows), 3, cols)
        orig_hw = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig_hw[0], orig_hw[1]), mode="bilinear",
                             align_corners=False)

    @torch.no_grad()
    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input,
                orig_im_size):
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.embed_mask(mask_input, has_mask_input)
        low_res, iou = self.sam.mask_decoder.predict_masks(
            image_embeddings=image_embeddings, image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense)
        return self.upscale_masks(low_res, orig_im_size), iou, low_res


def example_decoder_inputs(sam: nn.Module, num_points: int = 3,
                           orig_hw: tuple[int, int] = (480, 640)) -> tuple[torch.Tensor, ...]:
    """Random inputs with the decoder interface's shapes (used for tracing)."""
    c = int(sam.prompt_encoder.embed_dim)
    e = int(sam.prompt_encoder.image_embedding_size[0])
    s = float(sam.image_encoder.img_size)
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, c, e, e, generator=gen),
            torch.rand(1, num_points, 2, generator=gen) * s,
            torch.tensor([[1.0] * (num_points - 2) + [2.0, 3.0]]),
            torch.zeros(1, 1, 4 * e, 4 * e),
            torch.zeros(1),
            torch.tensor([float(orig_hw[0]), float(orig_hw[1])]))


def export_encoder(sam: nn.Module, path: str | Path, opset: int = OPSET) -> Path:
    """Trace the image encoder at its one fixed size `[1, 3, S, S]` into `path`."""
    s = int(sam.image_encoder.img_size)
    image = torch.zeros(1, 3, s, s)
    _onnx_export(SamEncoderGraph(sam).eval(), (image,), path, ENCODER_INPUTS, ENCODER_OUTPUTS,
                 dynamic_axes=None, opset=opset)
    return Path(path)


def export_decoder(sam: nn.Module, path: str | Path, opset: int = OPSET) -> Path:
    """Trace the decoder with dynamic point count N and dynamic output size (h, w)."""
    dynamic_axes = {"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"},
                    "masks": {2: "orig_h", 3: "orig_w"}}
    _onnx_export(SamDecoderGraph(sam).eval(), example_decoder_inputs(sam), path, DECODER_INPUTS,
                 DECODER_OUTPUTS, dynamic_axes=dynamic_axes, opset=opset)
    return Path(path)


def _onnx_export(module, args, path, input_names, output_names, dynamic_axes, opset) -> None:
    # The TorchScript exporter traces data-dependent output sizes (orig_im_size) as graph ops;
    # torch.export would need unbacked symbolic sizes for them.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=list(input_names),
                          output_names=list(output_names), dynamic_axes=dynamic_axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
