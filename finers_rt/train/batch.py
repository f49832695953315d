"""Batches for the VLM stages: prompt + target tokens, pixel patches, and the training losses.

A sample is (stage image [h, w, 3] uint8 RGB, user text, target text). The prompt is the
checkpoint's chat template for one user turn "image then text" (exactly what the runtime feeds),
the target the assistant's answer followed by `<|im_end|>`. Only target tokens carry loss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, is_dataclass

import numpy as np
import torch
import torch.nn.functional as F

from finers_rt.image import VisionPreprocessConfig, preprocess_image
from finers_rt.train.model import COORD_STEP, coordinate_token_map

IGNORE = -100


@dataclass
class Batch:
    """input_ids / attention_mask / labels [B, S] int64; pixel_values [sum patches, 1176] f32;
    image_grid_thw [B, 3]; pointer_index [B] (target merged-token index, -1 = none);
    image_spans [B, 2] (first image-token position, count); answer_pos [B] (last prompt pos);
    cell_labels [B, cells, A] per-image-token attribute labels (`train.dense`) or None;
    image_keys [B] the cache row of each image (frozen-vision runs, `train.frozen_vision`) or None;
    query_labels [B, fields] the target attributes each question names (`dense.QueryHead`) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    pointer_index: torch.Tensor
    image_spans: torch.Tensor
    answer_pos: torch.Tensor
    cell_labels: torch.Tensor | None = None
    image_keys: torch.Tensor | None = None
    query_labels: torch.Tensor | None = None
    region_labels: torch.Tensor | None = None  # [B] (`tie.region_label`, -1 = none) or None

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}


class Collator:
    """Turns samples into a `Batch` with the processor of a checkpoint (tokenizer + template)."""

    def __init__(self, processor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.end_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id
        ip = processor.image_processor
        self.vision = VisionPreprocessConfig(
            patch_size=ip.patch_size, temporal_patch_size=ip.temporal_patch_size,
            merge_size=ip.merge_size, min_pixels=ip.min_pixels, max_pixels=ip.max_pixels,
            image_mean=tuple(ip.image_mean), image_std=tuple(ip.image_std))
        coord = coordinate_token_map(self.tokenizer)
        self.coord_ids = torch.tensor(sorted(coord), dtype=torch.long)  # [C]
        self.coord_values = torch.tensor([coord[i] for i in sorted(coord)], dtype=torch.float32)
        self.coord_lookup = torch.full((len(self.tokenizer) + 64,), -1, dtype=torch.long)
        self.coord_lookup[self.coord_ids] = torch.arange(len(self.coord_ids))

    def prompt_ids(self, text: str, num_image_tokens: int) -> list[int]:
        """Token ids of the chat prompt with `num_image_tokens` image pads (generation prompt on)."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        rendered = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
        rendered = rendered.replace("<|image_pad|>", "<|image_pad|>" * num_image_tokens, 1)
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def __call__(self, images, texts, targets, pointer_xy=None) -> Batch:
        """images: list of [h, w, 3] uint8; texts / targets: lists of str; pointer_xy: list of
        (x, y) target centres in the image's pixel frame (or None)."""
        rows, label_rows, pixels, grids, spans, answer_pos, pointer = [], [], [], [], [], [], []
        for i, (image, text, target) in enumerate(zip(images, texts, targets)):
            patches, grid = preprocess_image(np.ascontiguousarray(image), self.vision)
            merge = self.vision.merge_size
            n_img = grid[0] * grid[1] * grid[2] // merge ** 2
            prompt = self.prompt_ids(text, n_img)
            answer = self.answer_ids(target)
            rows.append(prompt + answer)
            label_rows.append([IGNORE] * len(prompt) + answer)
            pixels.append(torch.from_numpy(patches))
            grids.append(grid)
            spans.append((prompt.index(self.image_pad_id), n_img))
            answer_pos.append(len(prompt) - 1)
            pointer.append(self.pointer_cell(image.shape, grid, pointer_xy[i] if pointer_xy else None))
        ids, mask, labels = self.pad(rows, label_rows)
        return Batch(ids, mask, labels, torch.cat(pixels), torch.tensor(grids, dtype=torch.long),
                     torch.tensor(pointer, dtype=torch.long), torch.tensor(spans, dtype=torch.long),
                     torch.tensor(answer_pos, dtype=torch.long))

    @functools.cached_property
    def quote_token_ids(self) -> frozenset[int]:
        """Ids of the vocabulary tokens that contain a single quote (the one that closes a
        response value is among them)."""
        to_text = self.tokenizer.convert_tokens_to_string
        return frozenset(i for t, i in self.tokenizer.get_vocab().items() if "'" in to_text([t]))

    def pad(self, rows: list[list[int]], label_rows: list[list[int]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded (input_ids, attention_mask, labels) [B, max len] of token rows."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, :len(r)] = torch.tensor(lab)
            mask[i, :len(r)] = 1
        return ids, mask, labels

    def answer_ids(self, target: str) -> list[int]:
        """Token ids of an assistant answer: the target text, then `<|im_end|>`."""
        return self.tokenizer(target, add_special_tokens=False)["input_ids"] + [self.end_id]

    def pointer_cell(self, shape, grid, xy) -> int:
        """Raster index of the merged token (processor order) that covers pixel (x, y)."""
        if xy is None:
            return -1
        merge = self.vision.merge_size
        rows, cols = grid[1] // merge, grid[2] // merge
        col = min(int(xy[0] / shape[1] * cols), cols - 1)
        row = min(int(xy[1] / shape[0] * rows), rows - 1)
        return row * cols + col


def token_losses(logits: torch.Tensor, labels: torch.Tensor, collator: Collator,
                 coord_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_loss, coord_loss): mean CE over non-coordinate target tokens, and over coordinate
    tokens a CE against a Gaussian over the coordinate tokens (sigma in coordinate steps;
    0 = plain one-hot) so a near miss costs less than a far one. logits [B, S, V]."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    valid = targets != IGNORE
    lookup = collator.coord_lookup.to(targets.device)
    coord_ids = collator.coord_ids.to(logits.device)
    coord_slot = torch.where(valid, lookup[targets.clamp(min=0)], torch.full_like(targets, -1))
    is_coord = coord_slot >= 0
    text_mask = valid & ~is_coord
    text_loss = (F.cross_entropy(logits[text_mask], targets[text_mask])
                 if text_mask.any() else logits.sum() * 0)
    if not is_coord.any():
        return text_loss, logits.sum() * 0
    logp = F.log_softmax(logits[is_coord], dim=-1)[:, coord_ids]  # [n, C]
    if coord_sigma <= 0:
        coord_loss = -logp.gather(1, coord_slot[is_coord][:, None]).mean()
    else:
        values = collator.coord_values.to(logits.device)
        true_v = values[coord_slot[is_coord]]  # [n]
        dist = (values[None, :] - true_v[:, None]) / (COORD_STEP * coord_sigma)
        soft = torch.softmax(-0.5 * dist ** 2, dim=-1)
        coord_loss = -(soft * logp).sum(-1).mean()
    return text_loss, coord_loss


class PointerHead(torch.nn.Module):
    """Training-only auxiliary head (never exported): from the last prompt position's hidden
    state, score every image token's hidden state; CE against the target's merged token.
    It pushes the LM to carry "where is the target" in its states before it writes numbers."""

    def __init__(self, hidden: int, dim: int = 64):
        super().__init__()
        self.query = torch.nn.Linear(hidden, dim)
        self.key = torch.nn.Linear(hidden, dim)

    def forward(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """hidden [B, S, H] (last layer) -> mean CE over samples with a pointer target."""
        losses = []
        for i in range(hidden.shape[0]):
            target = int(batch.pointer_index[i])
            if target < 0:
                continue
            start, count = (int(v) for v in batch.image_spans[i])
            keys = self.key(hidden[i, start:start + count])  # [N, d]
            losses.append(self.cross_entropy(keys, hidden[i, int(batch.answer_pos[i])], target))
        return torch.stack(losses).mean() if losses else hidden.sum() * 0

    def cross_entropy(self, keys: torch.Tensor, query_state: torch.Tensor, target: int) -> torch.Tensor:
        """CE of the target among the image tokens: keys [N, d] (`self.key` of their states),
        query_state [H] (the last prompt position's state)."""
        scores = keys @ self.query(query_state) / keys.shape[-1] ** 0.5  # [N]
        return F.cross_entropy(scores[None], torch.tensor([target], device=scores.device))


def to_device(batch, device: str):
    """`batch` (a `Batch` or any dataclass of tensors / None / nested such dataclasses) on
    `device`; the same object on cpu."""
    if device == "cpu":
        return batch
    moved = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if is_dataclass(value):
            value = to_device(value, device)
        elif value is not None:
            value = value.to(device, non_blocking=True)
        moved[f.name] = value
    return type(batch)(**moved)
