"""Coordinate maps on constructed cases with known answers."""

import numpy as np
import pytest

from finers_rt.geometry import (box_inside, box_iou, clamp_box, crop_is_empty, crop_to_image_box,
                                crop_to_image_points, dynamic_box, stage_to_frame_box,
                                stage_to_frame_points, tile_grid)


def test_gse_region_to_original_uses_reference_rounding():
    # 3840x2160 image, GSE frame 1920x1080: factor 2 exactly.
    assert stage_to_frame_box((100, 50, 356, 306), (3840, 2160), (1920, 1080)) == (200, 100, 712, 612)
    # 4000x3000: factors 2.0833.., 2.777..; round(int(v) * f) with Python's round.
    fx, fy = 4000 / 1920, 3000 / 1080
    box = (101.9, 33, 357, 289)
    want = (round(101 * fx), round(33 * fy), round(357 * fx), round(289 * fy))
    assert stage_to_frame_box(box, (4000, 3000), (1920, 1080)) == want


def test_dynamic_box_centre_side_and_clamp():
    # A 256 region in the middle of a 4K image -> 512 square centred on it.
    assert dynamic_box((1000, 1000, 1256, 1256), (3840, 2160)) == (872, 872, 1384, 1384)
    # A large region keeps its larger side.
    assert dynamic_box((0, 0, 800, 600), (3840, 2160)) == (0, 0, 800, 700)
    # Clamped to W-1 / H-1 at the border, like the reference.
    assert dynamic_box((3700, 2000, 3840, 2160), (3840, 2160)) == (3514, 1824, 3839, 2159)


def test_lpr_crop_round_trip_known_box():
    # A known object at (1500, 900)-(1540, 960) in a 4K image, crop (1264, 674)-(1776, 1186) (512 px).
    crop = (1264, 674, 1776, 1186)
    crop_wh = (crop[2] - crop[0], crop[3] - crop[1])
    obj_crop = (1500 - 1264, 900 - 674, 1540 - 1264, 960 - 674)
    # LPR sees the crop resized to 512x512: same scale here, so coordinates are identical.
    in_lpr = tuple(int(v * 512 / s) for v, s in zip(obj_crop, crop_wh * 2))
    back = stage_to_frame_box(in_lpr, crop_wh, (512, 512))
    assert crop_to_image_box(back, crop) == (1500, 900, 1540, 960)
    pts = stage_to_frame_points([(250, 250), (260, 270)], crop_wh, (512, 512))
    assert crop_to_image_points(pts, crop) == ((1514, 924), (1524, 944))


def test_non_square_crop_scaling():
    crop_wh = (300, 600)  # crop clamped at a border
    assert stage_to_frame_box((0, 0, 512, 512), crop_wh, (512, 512)) == (0, 0, 300, 600)
    assert stage_to_frame_box((256, 256, 256, 256), crop_wh, (512, 512)) == (150, 300, 150, 300)


def test_crop_is_empty_and_clamp():
    assert crop_is_empty((10, 10, 10, 50))
    assert crop_is_empty((10, 60, 20, 50))
    assert not crop_is_empty((0, 0, 1, 1))
    assert clamp_box((50, 80, -5, 2000), (100, 100)) == (0, 80, 50, 100)


def test_box_inside_and_iou():
    assert box_inside((1, 1, 5, 5), (0, 0, 5, 5))
    assert not box_inside((1, 1, 6, 5), (0, 0, 5, 5))
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    assert box_iou((0, 0, 0, 0), (0, 0, 1, 1)) == 0.0


@pytest.mark.parametrize("size", [(3840, 2160), (512, 512), (300, 200), (7680, 4320), (12000, 3000)])
def test_tiles_cover_the_image(size):
    tiles = tile_grid(size, 512, overlap=0.25)
    covered = np.zeros((size[1] // 8 + 1, size[0] // 8 + 1), bool)
    for x1, y1, x2, y2 in tiles:
        assert 0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
        covered[y1 // 8:(y2 + 7) // 8, x1 // 8:(x2 + 7) // 8] = True
    assert covered[: size[1] // 8, : size[0] // 8].all()
