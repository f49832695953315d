"""Training on several questions about one image with one pass over the image prefix.

In the FineRS chat prompt the image comes first in the user turn, so every token up to and
including `<|vision_end|>` is the same for all questions about that image, and with causal
attention its hidden states and K/V do not depend on the question. The runtime uses this to
prefill an image once per image (`kvcache`); training can use it too:

- one forward over the distinct images' prefixes (batch I, length P), keeping the K/V cache
  in the autograd graph (the pointer model's extra K/V pair included);
- the cache rows are repeated for the questions of each image (index_select: differentiable);
- one forward over the question suffixes (batch B, length L: question text, answer) with
  M-RoPE positions continuing after the prefix, exactly as `get_rope_index` numbers them.

The losses and gradients equal those of the plain batch of the same B samples (each carrying its
image), tested in `tests/test_train.py`; the prefix is computed I times instead of B. For a GSE
at 1288x728 (a 1,228-token prefix against ~245 question + answer tokens, 271 padded) and 8
questions per image this cuts the tokens the LM processes per question by ~3.5x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from finers_rt.image import preprocess_image
from finers_rt.train.batch import IGNORE, Batch, Collator


@dataclass
class SharedBatch:
    """`prefix`: a `Batch` of the I distinct images whose input_ids [I, P] are the common prompt
    prefix (system turn .. `<|vision_end|>`), with pixel_values, image_grid_thw, image_spans
    (in prefix coordinates), image_keys and cell_labels per image.
    Per question (B): suffix_ids / suffix_mask / labels [B, L] (the rest of the prompt, then the
    answer; only answer tokens carry labels), owner [B] (its image's row in `prefix`),
    pointer_index [B] (target merged-token index, -1 = none), answer_pos [B] (last prompt
    position, in suffix coordinates)."""

    prefix: Batch
    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    labels: torch.Tensor
    owner: torch.Tensor
    pointer_index: torch.Tensor
    answer_pos: torch.Tensor
    query_labels: torch.Tensor | None = None  # [B, fields] (`dense.QueryHead`) or None
    region_labels: torch.Tensor | None = None  # [B] (`tie.region_label`, -1 = none) or None

    @property
    def num_questions(self) -> int:
        return int(self.suffix_ids.shape[0])


def collate_shared(collator: Collator, images, groups, keys=None) -> SharedBatch:
    """images: I [h, w, 3] uint8; groups: per image a list of (user text, target text, pointer
    (x, y) or None); keys: per image its cache row (frozen-vision memo key) or None."""
    if len(images) != len(groups) or not images:
        raise ValueError("collate_shared needs one non-empty question group per image")
    vision_end = collator.tokenizer.convert_tokens_to_ids("<|vision_end|>")
    merge = collator.vision.merge_size
    prefixes, pixels, grids, spans = [], [], [], []
    rows, label_rows, owner, pointer, answer_pos = [], [], [], [], []
    for i, (image, questions) in enumerate(zip(images, groups)):
        if not questions:
            raise ValueError(f"image {i} has no questions")
        patches, grid = preprocess_image(np.ascontiguousarray(image), collator.vision)
        n_img = grid[0] * grid[1] * grid[2] // merge ** 2
        pixels.append(torch.from_numpy(patches))
        grids.append(grid)
        prefix = None
        for text, target, xy in questions:
            prompt = collator.prompt_ids(text, n_img)
            split = prompt.index(vision_end) + 1
            if prefix is None:
                prefix = prompt[:split]
            elif prompt[:split] != prefix:  # cannot happen with an image-first chat template
                raise ValueError("the questions of one image do not share the prompt prefix")
            answer = collator.answer_ids(target)
            rows.append(prompt[split:] + answer)
            label_rows.append([IGNORE] * (len(prompt) - split) + answer)
            owner.append(i)
            pointer.append(collator.pointer_cell(image.shape, grid, xy))
            answer_pos.append(len(prompt) - 1 - split)
        prefixes.append(prefix)
        spans.append((prefix.index(collator.image_pad_id), n_img))
    if len({len(p) for p in prefixes}) != 1:
        raise ValueError("images of one shared batch must have the same number of image tokens "
                         "(the same stage size)")
    ids, mask, labels = collator.pad(rows, label_rows)
    prefix_ids = torch.tensor(prefixes, dtype=torch.long)
    n_images = len(images)
    prefix = Batch(prefix_ids, torch.ones_like(prefix_ids), torch.full_like(prefix_ids, IGNORE),
                   torch.cat(pixels), torch.tensor(grids, dtype=torch.long),
                   torch.full((n_images,), -1, dtype=torch.long),
                   torch.tensor(spans, dtype=torch.long),
                   torch.full((n_images,), prefix_ids.shape[1] - 1, dtype=torch.long),
                   image_keys=None if keys is None else torch.tensor(list(keys), dtype=torch.long))
    return SharedBatch(prefix, ids, mask, labels, torch.tensor(owner, dtype=torch.long),
                       torch.tensor(pointer, dtype=torch.long),
                       torch.tensor(answer_pos, dtype=torch.long))


class SharedPrefixForward(torch.nn.Module):
    """Both passes as one module call, so DDP sees one forward per backward.
    forward(batch, memo) -> (prefix output, suffix output), hidden states included."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch: SharedBatch, memo=None):
        model, pre = self.model, batch.prefix
        inputs = pre.model_inputs() if memo is None else memo.model_inputs(model, pre)
        positions, _ = model.model.get_rope_index(pre.input_ids, pre.image_grid_thw, None,
                                                  attention_mask=pre.attention_mask)
        out_p = model(**inputs, position_ids=positions, past_key_values=DynamicCache(),
                      use_cache=True, output_hidden_states=True)
        cache = out_p.past_key_values
        for layer in cache.layers:  # every question reads its image's rows
            layer.keys = layer.keys.index_select(0, batch.owner)
            layer.values = layer.values.index_select(0, batch.owner)
        n_prefix = pre.input_ids.shape[1]
        n_suffix = batch.suffix_ids.shape[1]
        start = positions.amax(dim=(0, 2)) + 1  # [I]: text after the image continues from here
        steps = torch.arange(n_suffix, device=start.device)
        suffix_pos = (start[batch.owner][:, None] + steps[None]).unsqueeze(0).expand(3, -1, -1)
        mask = torch.cat([torch.ones((batch.num_questions, n_prefix), dtype=batch.suffix_mask.dtype,
                                    device=batch.suffix_mask.device), batch.suffix_mask], dim=1)
        out_s = model(input_ids=batch.suffix_ids, attention_mask=mask, position_ids=suffix_pos,
                      past_key_values=cache, use_cache=True, output_hidden_states=True,
                      cache_position=torch.arange(n_prefix, n_prefix + n_suffix,
                                                  device=batch.suffix_ids.device))
        return out_p, out_s


def pointer_head_loss(head, prefix_hidden: torch.Tensor, suffix_hidden: torch.Tensor,
                      batch: SharedBatch) -> torch.Tensor:
    """`batch.PointerHead`'s loss for a shared batch: the keys come from the image's prefix
    states (computed once per image), the query from the question's last prompt position."""
    keys = {}
    losses = []
    for i in range(batch.num_questions):
        target = int(batch.pointer_index[i])
        if target < 0:
            continue
        img = int(batch.owner[i])
        if img not in keys:
            start, count = (int(v) for v in batch.prefix.image_spans[img])
            keys[img] = head.key(prefix_hidden[img, start:start + count])
        losses.append(head.cross_entropy(keys[img], suffix_hidden[i, int(batch.answer_pos[i])], target))
    return torch.stack(losses).mean() if losses else suffix_hidden.sum() * 0
