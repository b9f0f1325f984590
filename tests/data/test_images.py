"""Wide image modes (16-bit, 32-bit int, float) are rescaled to 8 bits, not clipped to white or black."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from repvit.data.images import to_mode

GRAD16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))   # a horizontal 0..65535 ramp


def _want8() -> np.ndarray:
    return (GRAD16.astype(np.int64) >> 8).astype(np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_16bit_png_keeps_its_gradient(tmp_path, mode):
    p = tmp_path / "g16.png"
    Image.fromarray(GRAD16).save(p)
    with Image.open(p) as im:
        assert im.mode in ("I;16", "I")               # what Pillow makes of a 16-bit PNG
        plain = np.asarray(im.convert("L"))
        got = np.asarray(to_mode(im, mode))
    assert (plain == 255).mean() > 0.9                # the bug this guards against: Pillow clips, all white
    assert got.shape == ((8, 64, 3) if mode == "RGB" else (8, 64))
    chan = got[..., 0] if mode == "RGB" else got
    np.testing.assert_array_equal(chan, _want8())
    if mode == "RGB":
        assert (got[..., 0] == got[..., 2]).all()


def test_32bit_int_image_is_read_as_16bit_data():
    im = Image.fromarray(GRAD16.astype(np.int32), "I")
    np.testing.assert_array_equal(np.asarray(to_mode(im, "L")), _want8())


@pytest.mark.parametrize("peak", [1.0, 255.0])
def test_float_image_0_to_1_or_0_to_255(tmp_path, peak):
    a = np.tile(np.linspace(0, peak, 64, dtype=np.float32), (8, 1))
    p = tmp_path / "f.tif"
    Image.fromarray(a, "F").save(p)
    with Image.open(p) as im:
        assert im.mode == "F"
        got = np.asarray(to_mode(im, "L")).astype(int)
    want = np.rint(a * (255.0 / peak)).astype(int)
    assert np.abs(got - want).max() <= 1 and got.max() == 255 and got.min() == 0


def test_8bit_modes_convert_as_pillow_does():
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    np.testing.assert_array_equal(np.asarray(to_mode(rgba, "RGB")), np.asarray(rgba.convert("RGB")))
    pal = rgba.convert("P")
    np.testing.assert_array_equal(np.asarray(to_mode(pal, "L")), np.asarray(pal.convert("L")))


def test_the_result_outlives_the_file(tmp_path):
    """Readers open the file in a ``with`` block: what comes back must be loaded, also when already in the mode."""
    p = tmp_path / "rgb.png"
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(p)
    with Image.open(p) as im:
        out = to_mode(im, "RGB")
    assert np.asarray(out.crop((0, 0, 4, 4))).max() == 7


def test_class_folder_reads_a_16bit_image_correctly(tmp_path):
    from repvit.data.folder import SafeImageFolder
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.fromarray(GRAD16).save(tmp_path / c / "x.png")
    img, target = SafeImageFolder(tmp_path)[0]
    np.testing.assert_array_equal(np.asarray(img)[..., 1], _want8())
