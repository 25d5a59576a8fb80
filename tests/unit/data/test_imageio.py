"""Tests of clipad.imageio: every odd-but-valid image loads as 8-bit RGB, every broken one
raises ImageReadError naming the file and the reason. All files are made here with PIL."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipad.errors import ClipadError, ImageReadError
from clipad.data.images import IMAGE_EXTENSIONS, list_images, load_image, load_mask


def _assert_rgb8(image: Image.Image, size: tuple[int, int]) -> None:
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == size
    assert np.asarray(image).dtype == np.uint8


# --------------------------------------------------------------------------- valid images


def test_rgb_png_roundtrip_is_exact(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    image = load_image(tmp_path / "x.png")
    _assert_rgb8(image, (9, 7))
    np.testing.assert_array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_replicated_to_three_channels(tmp_path: Path, mode: str) -> None:
    gray = np.zeros((6, 5), np.uint8)
    gray[2:4, 1:3] = 255
    Image.fromarray(gray).convert(mode).save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (6, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_gray_alpha_drops_alpha(tmp_path: Path) -> None:
    gray = np.full((4, 4), 90, np.uint8)
    alpha = np.zeros((4, 4), np.uint8)  # fully transparent: colour must still be kept
    Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)]).save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png"))
    assert out.shape == (4, 4, 3)
    assert (out == 90).all()


def test_rgba_drops_alpha_keeps_colour(tmp_path: Path) -> None:
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 10, 120, 240
    rgba[..., 3] = np.arange(6, dtype=np.uint8)[None, :] * 40
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert out.shape == (5, 6, 3)
    np.testing.assert_array_equal(out, rgba[..., :3])


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_with_and_without_transparency(tmp_path: Path, transparency: bool) -> None:
    image = Image.new("P", (8, 3))
    palette = [0, 0, 0, 200, 30, 40, 5, 250, 60] + [0] * (256 * 3 - 9)
    image.putpalette(palette)
    image.putdata([0, 1, 2] * 8)
    kwargs = {"transparency": 1} if transparency else {}
    image.save(tmp_path / "p.png", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Pillow warning about palette transparency
        out = load_image(tmp_path / "p.png")
    _assert_rgb8(out, (8, 3))
    colours = {tuple(c) for c in np.asarray(out).reshape(-1, 3)}
    assert colours == {(0, 0, 0), (200, 30, 40), (5, 250, 60)}


def test_16bit_png_scaled_by_dtype_range(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")  # really a 16-bit file, not silently 8-bit
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out.shape == (1, 4, 3)
    # v / 257: exact at the ends, 32896 -> 128 (clipping at 255 would give 255 everywhere
    # but 0; taking the low byte would give 0, 1, 128, 255 only by accident)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_scaling_is_monotone_over_the_range(tmp_path: Path) -> None:
    values = np.linspace(0, 65535, 64).astype(np.uint16)[None, :]
    Image.fromarray(values).save(tmp_path / "ramp.png")
    out = np.asarray(load_image(tmp_path / "ramp.png"))[0, :, 0].astype(int)
    assert out[0] == 0 and out[-1] == 255
    assert (np.diff(out) >= 0).all()
    np.testing.assert_allclose(out, values[0] / 65535 * 255, atol=0.51)


def test_float_tiff(tmp_path: Path) -> None:
    values = np.array([[0.0, 0.25, 0.5, 1.0]], np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    out = np.asarray(load_image(tmp_path / "f.tif"))
    np.testing.assert_array_equal(out[0, :, 0], np.rint(values[0] * 255))


def test_cmyk_jpeg_converted_to_rgb(tmp_path: Path) -> None:
    # pure cyan ink on the left, pure magenta on the right
    left = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    right = Image.new("CMYK", (16, 16), (0, 255, 0, 0))
    image = Image.new("CMYK", (32, 16))
    image.paste(left, (0, 0))
    image.paste(right, (16, 0))
    image.save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    out = np.asarray(load_image(tmp_path / "cmyk.jpg")).astype(int)
    cyan, magenta = out[8, 4], out[8, 28]
    assert cyan[0] < 40 and cyan[1] > 215 and cyan[2] > 215
    assert magenta[1] < 40 and magenta[0] > 215 and magenta[2] > 215


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    pixels = np.zeros((30, 40, 3), np.uint8)  # stored 40 wide x 30 high
    pixels[:, :20] = (255, 0, 0)  # left half red in storage
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(tmp_path / "rot.jpg")
    _assert_rgb8(out, (30, 40))  # displayed 30 wide x 40 high
    arr = np.asarray(out).astype(int)
    # a clockwise quarter turn moves the stored left half to the top
    assert arr[5, 15, 0] > 200 and arr[5, 15, 1] < 50
    assert arr[35, 15, 0] < 50


def test_very_small_image(tmp_path: Path) -> None:
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "tiny.bmp")
    out = load_image(tmp_path / "tiny.bmp")
    _assert_rgb8(out, (10, 10))
    assert (np.asarray(out) == (1, 2, 3)).all()


def test_very_large_image_loads_without_warning(tmp_path: Path) -> None:
    Image.new("L", (8000, 8000), 77).save(tmp_path / "big.png", compress_level=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 64 MP is under Pillow's decompression-bomb warning
        out = load_image(tmp_path / "big.png")
    assert out.size == (8000, 8000) and out.mode == "RGB"
    assert out.getpixel((7999, 7999)) == (77, 77, 77)


def test_image_above_pillow_limit_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    # Pillow refuses images above 2 * MAX_IMAGE_PIXELS; lower the limit rather than write a
    # 180 MP file. The limit must stay enforced (no silent disable).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError) as info:
        load_image(tmp_path / "bomb.png")
    assert "bomb.png" in str(info.value) and "too large" in str(info.value)
    assert "MAX_IMAGE_PIXELS" in str(info.value)


def test_returned_image_is_detached_from_file(tmp_path: Path) -> None:
    path = tmp_path / "d.png"
    Image.new("RGB", (4, 4), (9, 9, 9)).save(path)
    image = load_image(path)
    path.unlink()  # would fail on Windows with an open handle; pixels must already be in memory
    assert image.getpixel((0, 0)) == (9, 9, 9)


# --------------------------------------------------------------------------- broken inputs


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _noise_image(size: int = 64) -> Image.Image:
    # noise does not compress, so cutting the file removes pixel data, not just padding
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _raises_with(path: Path, *needles: str) -> ImageReadError:
    with pytest.raises(ImageReadError) as info:
        load_image(path)
    message = str(info.value)
    assert path.name in message, message
    for needle in needles:
        assert needle in message, message
    assert info.value.path == str(path)
    return info.value


def test_zero_byte_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    _raises_with(tmp_path / "empty.png", "empty file (0 bytes)")


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    _noise_image().save(path)
    _cut(path, 0.5)
    _raises_with(path, "truncated or corrupt image data")


def test_truncation_is_not_globally_tolerated(tmp_path: Path) -> None:
    from PIL import ImageFile

    path = tmp_path / "cut.jpg"
    _noise_image().save(path)
    _cut(path, 0.6)
    with pytest.raises(ImageReadError):
        load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_random_bytes_with_png_extension(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(2).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    _raises_with(path, "not an image file (cannot identify format)", "corrupt")


def test_corrupt_pixel_data_after_valid_header(tmp_path: Path) -> None:
    path = tmp_path / "garbled.png"
    _noise_image().save(path)
    data = bytearray(path.read_bytes())
    data[200:1200] = bytes(1000)  # overwrite compressed pixel data, keep the header intact
    path.write_bytes(bytes(data))
    _raises_with(path, "truncated or corrupt image data")


def test_text_file_with_jpg_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n" * 20)
    _raises_with(path, "not an image file (cannot identify format)")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "folder.png").mkdir()
    _raises_with(tmp_path / "folder.png", "directory")


def test_missing_file(tmp_path: Path) -> None:
    _raises_with(tmp_path / "ghost.png", "no such file")


def test_image_read_error_is_a_clipad_error(tmp_path: Path) -> None:
    with pytest.raises(ClipadError):
        load_image(tmp_path / "ghost.png")


# --------------------------------------------------------------------------- masks


def _save_mask(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values).save(path)
    return path


def test_binary_mask_no_warning(tmp_path: Path) -> None:
    values = np.zeros((6, 8), np.uint8)
    values[1:3, 2:5] = 255
    path = _save_mask(tmp_path / "m.png", values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = load_mask(path)
    assert mask.dtype == bool and mask.shape == (6, 8)
    np.testing.assert_array_equal(mask, values == 255)


def test_non_binary_mask_binarised_at_half_with_warning(tmp_path: Path) -> None:
    values = np.array([[0, 100, 127, 128, 200, 255]], np.uint8)
    path = _save_mask(tmp_path / "soft.png", values)
    with pytest.warns(UserWarning, match=r"non-binary mask .*soft\.png.*binarised at 0\.5"):
        mask = load_mask(path)
    np.testing.assert_array_equal(mask[0], values[0] > 127)


def test_label_mask_with_small_values_keeps_defects(tmp_path: Path) -> None:
    # raw VisA-style masks store defects as 1, 2, ...: thresholding at 127 would erase them
    values = np.zeros((5, 5), np.uint8)
    values[0, 0], values[4, 4] = 1, 2
    path = _save_mask(tmp_path / "labels.png", values)
    with pytest.warns(UserWarning, match="label mask"):
        mask = load_mask(path)
    np.testing.assert_array_equal(mask, values > 0)


def test_zero_one_mask_is_binary_without_warning(tmp_path: Path) -> None:
    values = np.zeros((4, 4), np.uint8)
    values[1, 1] = 1
    path = _save_mask(tmp_path / "01.png", values)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = load_mask(path)
    np.testing.assert_array_equal(mask, values == 1)


def test_explicit_threshold(tmp_path: Path) -> None:
    values = np.array([[0, 3, 200, 255]], np.uint8)
    path = _save_mask(tmp_path / "t.png", values)
    np.testing.assert_array_equal(load_mask(path, threshold=0.0)[0], [False, True, True, True])
    np.testing.assert_array_equal(load_mask(path, threshold=0.9)[0], [False, False, False, True])


def test_16bit_mask_uses_16bit_range(tmp_path: Path) -> None:
    values = np.array([[0, 65535, 0, 65535]], np.uint16)
    path = _save_mask(tmp_path / "m16.png", values)
    np.testing.assert_array_equal(load_mask(path)[0], [False, True, False, True])


def test_rgb_and_palette_masks(tmp_path: Path) -> None:
    values = np.zeros((4, 4), np.uint8)
    values[2:, :] = 255
    Image.fromarray(values).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(values).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(values).convert("1").save(tmp_path / "bit.png")
    for name in ("rgb.png", "pal.png", "bit.png"):
        np.testing.assert_array_equal(load_mask(tmp_path / name), values == 255)


def test_mask_resized_to_image_size_with_warning(tmp_path: Path) -> None:
    values = np.zeros((4, 6), np.uint8)
    values[:2, :3] = 255  # top-left quarter
    path = _save_mask(tmp_path / "small.png", values)
    with pytest.warns(UserWarning, match=r"mask '.*small\.png' is 6x4 but its image is 12x8; resized with nearest"):
        mask = load_mask(path, size=(8, 12))
    assert mask.shape == (8, 12) and mask.dtype == bool
    expected = np.zeros((8, 12), bool)
    expected[:4, :6] = True
    np.testing.assert_array_equal(mask, expected)


def test_mask_same_size_no_warning(tmp_path: Path) -> None:
    path = _save_mask(tmp_path / "same.png", np.zeros((4, 6), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = load_mask(path, size=(4, 6))
    assert mask.shape == (4, 6) and not mask.any()


def test_broken_mask_raises_with_name(tmp_path: Path) -> None:
    (tmp_path / "m_mask.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"m_mask\.png.*empty file"):
        load_mask(tmp_path / "m_mask.png")


# --------------------------------------------------------------------------- list_images


def test_image_extensions_cover_the_usual_formats() -> None:
    for ext in ("png", "jpg", "jpeg", "bmp", "tif", "tiff", "webp"):
        assert f".{ext}" in IMAGE_EXTENSIONS


def test_list_images_expands_directories(tmp_path: Path) -> None:
    root = tmp_path / "shots"
    (root / "sub").mkdir(parents=True)
    for name in ("b.png", "a.JPG", "c.jpeg", "sub/d.TIFF", "notes.txt", ".hidden.png", "e.webp"):
        (root / name).write_bytes(b"x")
    found = list_images(root)
    assert [p.relative_to(root).as_posix() for p in found] == ["a.JPG", "b.png", "c.jpeg", "e.webp", "sub/d.TIFF"]


def test_list_images_keeps_explicit_files_in_order(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.png").write_bytes(b"x")
    odd = tmp_path / "scan.dat"
    odd.write_bytes(b"x")
    first = tmp_path / "z.png"
    first.write_bytes(b"x")
    found = list_images([first, str(tmp_path / "dir"), odd])
    assert found == [first, tmp_path / "dir" / "x.png", odd]


def test_list_images_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ClipadError, match=r"nope.*does not exist"):
        list_images([tmp_path / "nope"])


def test_list_images_empty_directory(tmp_path: Path) -> None:
    assert list_images(tmp_path) == []
