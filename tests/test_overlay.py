"""overlay: the tinted mask equals the per-pixel blend; outputs are never overwritten silently."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from finers_rt.errors import InputError
from finers_rt.overlay import MASK_BGR, draw_overlay, write_outputs


def _result(mask, **kwargs):
    fields = {"region_xyxy": None, "bbox_xyxy": None, "points_xy": None, **kwargs}
    return SimpleNamespace(mask=mask, **fields)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_tint_equals_per_pixel_blend_inside_the_mask_only(alpha):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:20, 30:35] = True
    mask[40, 5] = mask[55, 70] = True  # a sparse mask: its bounding box holds unmasked pixels
    out = draw_overlay(image, _result(mask), alpha=alpha)
    bgr = image[:, :, ::-1]
    expected = bgr.copy()
    ys, xs = np.nonzero(mask)
    expected[ys, xs] = (bgr[ys, xs].astype(np.float32) * (1 - alpha) + MASK_BGR * alpha).astype(np.uint8)
    assert np.array_equal(out, expected)
    assert np.array_equal(draw_overlay(image, _result(np.zeros((60, 80), bool))), bgr)


def test_write_outputs_refuses_to_overwrite(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    result = _result(np.ones((20, 30), bool), region_xyxy=(1, 1, 10, 10), bbox_xyxy=(2, 2, 5, 5),
                     points_xy=((3, 3),))
    paths = write_outputs(tmp_path / "out", image, result)
    assert set(paths) == {"mask", "overlay"}
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_outputs(tmp_path / "out", image, result)
    write_outputs(tmp_path / "out", image, result, overwrite=True)
