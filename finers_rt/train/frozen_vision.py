"""SFT with a frozen vision tower: each stage image's features are computed once and reused.

With `--freeze-vision` the tower takes no gradient and is not in the optimizer, so its output
for a given cache image never changes during the run. `VisionMemo` keeps it (per process, in
memory) keyed by the image's row in the cache, and `model_inputs` scatters it into the token
embeddings the way Qwen2_5_VLModel does, so the LM, the in-model pointer and every loss see
exactly what they would see with `pixel_values` (tested), at the cost of the LM alone once an
image has been seen. The checkpoint written is the whole HF model, tower included, unchanged.
Typical use: `train vision` (dense per-cell labels) at a large input, then `train gse
--init VISION_RUN/checkpoint --freeze-vision`.
"""

from __future__ import annotations

import numpy as np
import torch

from finers_rt.train.batch import Batch


def freeze(model) -> None:
    """Take the vision tower out of training (no gradient, eval mode)."""
    visual = model.model.visual
    visual.requires_grad_(False)
    visual.eval()


class VisionMemo:
    """Merged-token features [n, hidden] of each cache image, computed on first use.

    `max_images` bounds the memory (a 1288x728 image is 1,196 x hidden fp32 values, ~1.2 MB at
    hidden 256); past it, images are computed every time they are drawn."""

    def __init__(self, visual, max_images: int = 20000):
        self.visual = visual
        self.max_images = max_images
        self.store: dict[int, torch.Tensor] = {}
        self.computed = 0

    def features(self, key: int, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        hit = self.store.get(key) if key >= 0 else None
        if hit is not None:
            return hit
        device = next(self.visual.parameters()).device
        with torch.no_grad():
            out = self.visual(pixels.to(device), grid_thw=grid[None].to(device))
        feats = getattr(out, "pooler_output", out).detach()
        self.computed += 1
        if key >= 0 and len(self.store) < self.max_images:
            self.store[key] = feats
        return feats

    def fill(self, images, vision_cfg, log=None) -> None:
        """Compute the features of `images` ((key, [h, w, 3] uint8) pairs) now, so that every
        training step costs the same (a time-limited run fits its schedule to that speed)."""
        from finers_rt.image import preprocess_image

        images = list(images)
        for n, (key, image) in enumerate(images, 1):
            if key in self.store or len(self.store) >= self.max_images:
                continue
            patches, grid = preprocess_image(np.ascontiguousarray(image), vision_cfg)
            self.features(key, torch.from_numpy(patches), torch.tensor(grid, dtype=torch.long))
            if log and (n % 100 == 0 or n == len(images)):
                log(f"frozen vision: {n}/{len(images)} images")

    def model_inputs(self, model, batch: Batch) -> dict[str, torch.Tensor]:
        """The forward kwargs of `batch` with the image features already in `inputs_embeds`
        (`input_ids` and `image_grid_thw` still go along: they give the M-RoPE positions)."""
        if batch.image_keys is None:
            raise ValueError("a frozen-vision batch needs image_keys (sample_batch sets them)")
        counts = batch.image_grid_thw.prod(-1).tolist()
        pixels = torch.split(batch.pixel_values, counts)
        feats = torch.cat([self.features(int(k), p, g) for k, p, g in
                           zip(batch.image_keys.tolist(), pixels, batch.image_grid_thw)])
        embed = model.get_input_embeddings()(batch.input_ids)
        image_token = model.config.image_token_id
        mask = (batch.input_ids == image_token)[..., None].expand_as(embed)
        if int(mask[..., 0].sum()) != feats.shape[0]:
            raise ValueError(f"{int(mask[..., 0].sum())} image tokens in the batch but "
                             f"{feats.shape[0]} image features")
        embeds = embed.masked_scatter(mask, feats.to(embed.dtype))
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "image_grid_thw": batch.image_grid_thw, "inputs_embeds": embeds}
