from finers_rt.scheduling import fallback_crops


def test_nearest_to_region_first_and_excludes_tried_crop():
    crops = fallback_crops((3840, 2160), 512, region_xyxy=(3000, 1800, 3256, 2056), limit=3)
    assert len(crops) == 3
    first = crops[0]
    assert first[0] <= 3128 <= first[2] and first[1] <= 1928 <= first[3]
    again = fallback_crops((3840, 2160), 512, region_xyxy=(3000, 1800, 3256, 2056),
                           exclude=first, limit=3)
    assert first not in again


def test_centre_out_without_region_and_limits():
    crops = fallback_crops((2048, 2048), 512, limit=2)
    x1, y1, x2, y2 = crops[0]
    assert x1 <= 1024 <= x2 and y1 <= 1024 <= y2
    assert fallback_crops((2048, 2048), 512, limit=0) == []
    assert fallback_crops((300, 200), 512, limit=5) == [(0, 0, 300, 200)]
