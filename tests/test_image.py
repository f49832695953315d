"""Image loading edge cases and Qwen2.5-VL preprocessing vs the slow HF processor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from finers_rt.errors import InputError
from finers_rt.image import (VisionPreprocessConfig, check_min_size, load_image, preprocess_for_stage,
                             preprocess_image, resize_for_stage, smart_resize)


def _gradient(height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8 with distinct values per row, column and channel (no symmetry)."""
    rows = np.arange(height, dtype=np.int64)[:, None]
    cols = np.arange(width, dtype=np.int64)[None, :]
    return np.stack([(rows * 7 + cols * 3) % 256, (rows * 2 + cols * 11) % 256,
                     (rows * cols) % 256], axis=2).astype(np.uint8)


# ---- preprocessing parity ---------------------------------------------------------------------


@pytest.mark.parametrize("height,width,max_pixels", [
    (37, 91, 12845056), (333, 517, 12845056), (601, 403, 200000), (20, 30, 100000),
    (513, 511, 12845056), (1080, 1920, 12845056)])
def test_pixel_values_equal_slow_hf_processor(height, width, max_pixels):
    transformers = pytest.importorskip("transformers")
    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    processor = transformers.Qwen2VLImageProcessor(min_pixels=3136, max_pixels=max_pixels)
    reference = processor(images=[image], return_tensors="np")
    pixel_values, grid_thw = preprocess_image(image, VisionPreprocessConfig(min_pixels=3136, max_pixels=max_pixels))
    assert pixel_values.dtype == np.float32
    assert grid_thw == tuple(int(v) for v in reference["image_grid_thw"][0])
    assert pixel_values.shape == reference["pixel_values"].shape
    assert np.abs(pixel_values - reference["pixel_values"]).max() == 0.0


def test_smart_resize_matches_hf_and_bounds():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    for height, width in [(1080, 1920), (512, 512), (7, 1300), (4000, 3000), (29, 57)]:
        for max_pixels in (12845056, 1003520, 50000):
            ours = smart_resize(height, width, 28, 3136, max_pixels)
            assert ours == hf_smart_resize(height, width, 28, 3136, max_pixels)
            assert ours[0] % 28 == 0 and ours[1] % 28 == 0 and ours[0] * ours[1] <= max_pixels
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_stage_resize_is_pil_bilinear_exact_size():
    image = _gradient(700, 1000)
    stage = resize_for_stage(image, (512, 512))
    assert stage.shape == (512, 512, 3) and stage.dtype == np.uint8
    expected = np.asarray(Image.fromarray(image).resize((512, 512), Image.Resampling.BILINEAR))
    assert np.array_equal(stage, expected)
    pixel_values, grid_thw = preprocess_for_stage(image, (1920, 1080))
    assert grid_thw == (1, 78, 138) and pixel_values.shape == (10764, 1176)


def test_patch_order_groups_merge_windows():
    """Patch k of merge window (bh, bw) holds the pixels of patch (2*bh + k//2, 2*bw + k%2)."""
    config = VisionPreprocessConfig()
    image = _gradient(56, 84)  # 4 x 6 patches of 14 -> 2 x 3 merge windows
    pixel_values, grid_thw = preprocess_image(image, config)
    lut = ((np.arange(256) / 255.0).astype(np.float32)[None] - np.float32(config.image_mean)[:, None]) \
        / np.float32(config.image_std)[:, None]
    window, inner = 1 * 3 + 2, 3  # window (bh=1, bw=2), inner patch (mh=1, mw=1)
    row, col = (2 * 1 + 1) * 14, (2 * 2 + 1) * 14
    patch = pixel_values[window * 4 + inner].reshape(3, 2, 14, 14)
    for channel in range(3):
        expected = lut[channel][image[row:row + 14, col:col + 14, channel]]
        assert np.array_equal(patch[channel, 0], expected) and np.array_equal(patch[channel, 1], expected)


def test_config_rejects_unknown_resample():
    with pytest.raises(InputError, match="did you mean 'bicubic'"):
        VisionPreprocessConfig(resample="bicubc")


# ---- loading ----------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    image = _gradient(40, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(image).save(path, quality=100, exif=exif)
    loaded = load_image(path)
    assert loaded.shape == (60, 40, 3)
    with Image.open(path) as raw:  # decoded pixels as stored, orientation not applied
        stored = np.asarray(raw.convert("RGB"))
    assert stored.shape == (40, 60, 3)
    assert np.array_equal(loaded, np.rot90(stored, k=-1))  # orientation 6 = rotate 90 clockwise


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_modes_become_rgb_uint8(tmp_path, mode):
    rgb = Image.fromarray(_gradient(30, 50))
    converted = rgb.convert(mode)
    path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    converted.save(path)
    loaded = load_image(path)
    assert loaded.shape == (30, 50, 3) and loaded.dtype == np.uint8
    if mode in ("L", "LA", "1"):
        assert np.array_equal(loaded[:, :, 0], loaded[:, :, 1])
    if mode == "RGBA":
        assert np.array_equal(loaded, _gradient(30, 50))


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    loaded = load_image(path)
    assert loaded.shape == (32, 64, 3)
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(loaded[:, :, 0], expected)
    assert loaded.max() > 200  # clipping at 255 would saturate; dropping the scale would wrap


def test_missing_empty_text_and_truncated_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n" * 20)
    with pytest.raises(InputError, match="not an image"):
        load_image(text)
    good = tmp_path / "good.png"
    Image.fromarray(_gradient(200, 200)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="truncated"):
        load_image(truncated)
    with pytest.raises(InputError, match="not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize("name, data", [
    ("header.jpg", b"\xff\xd8\xff\xe0garbage"),               # APP0 segment cut short
    ("sof.jpg", b"\xff\xd8\xff\xc0\x00\x11\x08"),            # frame header cut short
    ("ihdr.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00"),  # PNG header cut short
])
def test_files_damaged_in_the_header_are_input_errors(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError, match="truncated or corrupt|not an image"):
        load_image(path)


def test_array_inputs():
    image = _gradient(10, 12)
    assert load_image(image) is image  # contiguous HxWx3 uint8: no copy
    assert load_image(image[:, :, 0]).shape == (10, 12, 3)
    rgba = np.concatenate([image, np.full((10, 12, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(load_image(rgba), image)
    with pytest.raises(InputError, match=r"uint8.*\(10, 12, 3\) float32"):
        load_image(image.astype(np.float32))
    with pytest.raises(InputError, match=r"\(10, 12, 2\)"):
        load_image(image[:, :, :2])
    with pytest.raises(InputError, match="no pixels"):
        load_image(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(InputError, match="file path"):
        load_image(12)


def test_check_min_size_says_the_size():
    check_min_size(_gradient(30, 40), (40, 30))
    with pytest.raises(InputError, match=r"40x30 \(WxH\).*64x64"):
        check_min_size(_gradient(30, 40), (64, 64))


def test_strip_copy_equals_pillow_pixels_and_is_writable(tmp_path):
    from finers_rt.image import _rgb_image_to_array, _rgb_image_to_array_by_strips

    image = _gradient(37, 53)
    pil = Image.fromarray(image)
    for strip_bytes in (1, 500, 10_000, 1 << 24):  # 1 row, a few rows, whole image
        out = _rgb_image_to_array(pil, strip_bytes=strip_bytes)
        assert np.array_equal(out, image) and out.flags.writeable and out.flags.owndata
        by_strips = _rgb_image_to_array_by_strips(pil, np.empty_like(image), strip_bytes)
        assert np.array_equal(by_strips, image)
    path = tmp_path / "plain.png"
    pil.save(path)
    loaded = load_image(path)
    assert np.array_equal(loaded, image) and loaded.flags.writeable


# ---- the pipeline's frame (decode once, read crops and resizes) ------------------------------


def _jpeg_with_exif(tmp_path, image, orientation=None):
    path = tmp_path / f"frame-{orientation}.jpg"
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    Image.fromarray(image).save(path, quality=90, **kwargs)
    return path


@pytest.mark.parametrize("orientation", [None, 3, 6, 8])
def test_frame_pixels_crops_and_resizes_equal_load_image(tmp_path, orientation):
    from finers_rt.frame import Frame, open_frame

    path = _jpeg_with_exif(tmp_path, _gradient(90, 130), orientation)
    reference = load_image(path)
    for frame in (open_frame(path), open_frame(reference)):
        assert isinstance(frame, Frame) and frame.shape == reference.shape
        assert np.array_equal(frame.to_array(), reference)
        for box in [(0, 0, 40, 30), (10, 5, 200, 300), (-7, -3, 20, 25), (50, 60, 50, 70),
                    (120, 80, 400, 400), (0, 0, reference.shape[1], reference.shape[0])]:
            x1, y1, x2, y2 = box
            want = reference[max(y1, 0):y2, max(x1, 0):x2]
            got = frame.crop(box)
            assert got.shape == want.shape and np.array_equal(got, want), box
            assert got.flags.c_contiguous and got.flags.writeable
        for size in [(64, 36), (131, 91), (reference.shape[1], reference.shape[0])]:
            assert not frame.has_resized(size)
            assert np.array_equal(frame.resized(size), resize_for_stage(reference, size))
            assert frame.has_resized(size) and frame.resized(size) is frame.resized(size)


def test_frame_of_other_modes_and_bad_files(tmp_path):
    from finers_rt.frame import open_frame

    gray = tmp_path / "gray.png"
    Image.fromarray(_gradient(30, 50)[:, :, 0]).save(gray)
    assert np.array_equal(open_frame(gray).to_array(), load_image(gray))
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n" * 20)
    with pytest.raises(InputError, match="not an image"):
        open_frame(text)
    with pytest.raises(InputError, match="not found"):
        open_frame(tmp_path / "nope.jpg")
    with pytest.raises(InputError, match="uint8"):
        open_frame(np.zeros((4, 4, 3), np.float32))


def test_file_key_changes_with_the_file(tmp_path):
    import os

    from finers_rt.frame import file_key

    path = tmp_path / "a.png"
    Image.fromarray(_gradient(20, 20)).save(path)
    key = file_key(path)
    assert file_key(str(path)) == key
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1000))
    assert file_key(path) != key
    with pytest.raises(InputError, match="not found"):
        file_key(tmp_path / "missing.png")
