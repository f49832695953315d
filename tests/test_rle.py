"""COCO RLE: byte-equal with pycocotools both ways, plus every error path."""

from __future__ import annotations

import numpy as np
import pytest

from finers_rt.errors import InputError
from finers_rt.rle import decode_mask, encode_mask, mask_runs, rle_area, rle_counts

mask_api = pytest.importorskip("pycocotools.mask")


def _ref_encode(mask: np.ndarray) -> dict:
    return mask_api.encode(np.asfortranarray(mask.astype(np.uint8)))


def _cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(1234)
    cases = []
    for shape in [(1, 1), (1, 9), (9, 1), (1, 300), (300, 1), (5, 7), (37, 23), (64, 48)]:
        for p in (0.0, 0.03, 0.5, 0.97, 1.0):
            cases.append((f"{shape}-p{p}", rng.random(shape) < p))
    single = np.zeros((40, 30), bool)
    single[17, 11] = True
    cases.append(("single-pixel", single))
    first = np.zeros((6, 4), bool)
    first[0, 0] = True
    cases.append(("first-pixel", first))
    last = np.zeros((6, 4), bool)
    last[-1, -1] = True
    cases.append(("last-pixel", last))
    big = np.zeros((1500, 2000), bool)  # long runs -> multi-chunk counts and negative deltas
    big[1499, 1999] = True
    big[0, 0] = True
    big[700:720, 100:900] = True
    cases.append(("big-sparse", big))
    return cases


@pytest.mark.parametrize("name,mask", _cases(), ids=[c[0] for c in _cases()])
def test_encode_is_byte_equal_to_pycocotools(name, mask):
    ours = encode_mask(mask)
    ref = _ref_encode(mask)
    assert ours["size"] == [int(v) for v in ref["size"]]
    assert isinstance(ours["counts"], str)
    assert ours["counts"] == ref["counts"].decode("ascii")


@pytest.mark.parametrize("name,mask", _cases(), ids=[c[0] for c in _cases()])
def test_decode_of_pycocotools_strings(name, mask):
    ref = _ref_encode(mask)
    as_bytes = decode_mask(ref)
    as_str = decode_mask({"size": list(ref["size"]), "counts": ref["counts"].decode()})
    assert as_bytes.dtype == bool and as_bytes.shape == mask.shape
    np.testing.assert_array_equal(as_bytes, mask)
    np.testing.assert_array_equal(as_str, mask)
    assert rle_area(ref) == int(mask_api.area(ref)) == int(mask.sum())


def test_empty_size_mask_matches_pycocotools():
    mask = np.zeros((0, 5), bool)
    assert encode_mask(mask)["counts"] == _ref_encode(mask)["counts"].decode()
    assert decode_mask(encode_mask(mask)).shape == (0, 5)


def test_runs_start_with_zero_run():
    mask = np.array([[1, 0], [1, 1]], bool)  # Fortran order: 1, 1, 0, 1
    np.testing.assert_array_equal(mask_runs(mask), [0, 2, 1, 1])
    np.testing.assert_array_equal(mask_runs(~mask), [2, 1, 1])


def test_numeric_masks_use_nonzero():
    m = np.array([[0, 3], [255, 0]], np.uint8)
    assert encode_mask(m) == encode_mask(m != 0)


def test_uncompressed_counts_list():
    mask = np.array([[1, 0, 0], [1, 1, 0]], bool)  # Fortran: 1,1,0,1,0,0
    rle = {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}
    np.testing.assert_array_equal(decode_mask(rle), mask)
    ref = mask_api.frPyObjects(rle, 2, 3)
    np.testing.assert_array_equal(mask_api.decode(ref).astype(bool), mask)
    np.testing.assert_array_equal(rle_counts(encode_mask(mask)), rle["counts"])


@pytest.mark.parametrize("rle,message", [
    ({"size": [2, 2], "counts": "0\x01"}, "outside the valid range"),
    ({"size": [2, 2], "counts": "0é"}, "non-ASCII"),
    ({"size": [2, 2], "counts": "4`"}, "ends in the middle of a count"),
    ({"size": [2, 2], "counts": "0?"}, "sum to 15, expected h*w = 2*2 = 4"),
    ({"size": [2, 2], "counts": ""}, "sum to 0"),
    ({"size": [2, 2], "counts": "``````````````0"}, "spans 15 characters"),
    ({"size": [2, 2], "counts": "2O2"}, "negative run length"),
    ({"size": [2, 2], "counts": [1, -1, 4]}, "negative run length"),
    ({"size": [2, 2], "counts": [1, "a"]}, "list of ints"),
    ({"size": [2, 2], "counts": 7}, "string or a list of ints"),
    ({"size": [2], "counts": "4"}, "'size' must be [h, w]"),
    ({"size": [2, -1], "counts": "4"}, "'size' must be [h, w]"),
    ({"counts": "4"}, "with 'size' and 'counts'"),
])
def test_corrupt_rle_raises_input_error(rle, message):
    with pytest.raises(InputError) as info:
        decode_mask(rle)
    assert message in str(info.value)


def test_encode_rejects_non_2d_and_objects():
    with pytest.raises(InputError, match=r"2-D \[H, W\], got shape \(2, 2, 3\)"):
        encode_mask(np.zeros((2, 2, 3), bool))
    with pytest.raises(InputError, match="bool or numeric"):
        encode_mask(np.array([["a", "b"]]))


def test_decode_rejects_non_mapping():
    with pytest.raises(InputError, match="RLE must be an object with 'size' and 'counts', got list"):
        decode_mask([1, 2])
