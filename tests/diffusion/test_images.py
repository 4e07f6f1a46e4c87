"""diffusion.images: the one image reader (16-bit, palette, RGBA, EXIF, float / int32 TIFF, decompression-bomb limit),
uint8 conversion and the image grid."""
import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.images import image_grid, read_image, to_pil, to_uint8


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a = np.array([[0, 257, 32768, 65535]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = np.asarray(read_image(tmp_path / "g16.png"))
    np.testing.assert_array_equal(got[..., 0], [[0, 1, 128, 255]])
    assert (got == got[..., :1]).all() and got.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "g16.png", mode="L")), [[0, 1, 128, 255]])


def test_palette_with_transparency_gives_the_palette_colours_without_a_warning(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0] = (200, 10, 30)
    im = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4)
    im.info["transparency"] = b"\x00" * 4  # every entry transparent: the colours must survive
    im.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = np.asarray(read_image(tmp_path / "p.png"))
    np.testing.assert_array_equal(got, rgb)


def test_rgba_drops_alpha_and_keeps_colour(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 120, 250, 0  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), rgba[..., :3])


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = 255  # top-left marker
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    im.save(tmp_path / "rot.png", exif=exif)
    got = np.asarray(read_image(tmp_path / "rot.png"))
    np.testing.assert_array_equal(got, np.rot90(a, k=-1))
    np.testing.assert_array_equal(np.asarray(read_image(Image.open(tmp_path / "rot.png"))), np.rot90(a, k=-1))


@pytest.mark.parametrize("mode, values, want", [
    ("F", [[0.0, 0.5, 1.0]], [[0, 128, 255]]),          # float in [0, 1]: x 255
    ("F", [[2.0, 3.0, 4.0]], [[0, 128, 255]]),          # float elsewhere (depth in metres): min..max
    ("I", [[0, 100, 255]], [[0, 100, 255]]),            # int32 within 0..255: as is
    ("I", [[0, 257, 65535]], [[0, 1, 255]]),            # int32 within 16 bits: as 16-bit
    ("I", [[-10, 0, 10]], [[0, 128, 255]]),             # int32 elsewhere: min..max
])
def test_float_and_int32_tiffs(tmp_path, mode, values, want):
    dtype = np.float32 if mode == "F" else np.int32
    Image.fromarray(np.array(values, dtype), mode).save(tmp_path / "x.tif")
    assert Image.open(tmp_path / "x.tif").mode == mode
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "x.tif", mode="L")), want)


def test_nan_tiff_is_refused(tmp_path):
    Image.fromarray(np.array([[0.0, np.nan]], np.float32), "F").save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="NaN/Inf"):
        read_image(tmp_path / "nan.tif")


@pytest.mark.parametrize("pixels", [40 * 40, 64 * 64])  # over the limit (PIL only warns below 2x) and over 2x
def test_decompression_bomb_limit_is_an_error_naming_the_fix(tmp_path, monkeypatch, pixels):
    side = int(pixels ** 0.5)
    Image.new("RGB", (side, side)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError,
                       match=r"big\.png: .*raise PIL\.Image\.MAX_IMAGE_PIXELS \(now 1000\)"):
        read_image(tmp_path / "big.png")
    data = (tmp_path / "big.png").read_bytes()
    with pytest.raises(Image.DecompressionBombError, match="<image bytes>"):
        read_image({"bytes": data, "path": None})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels)  # at the limit: read
    assert read_image(tmp_path / "big.png").size == (side, side)


def test_other_sources_and_errors(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    for src in (rgb, Image.fromarray(rgb), {"bytes": buf.getvalue(), "path": None}, {"path": str(tmp_path / "x.png")},
                "x.png"):
        np.testing.assert_array_equal(np.asarray(read_image(src, root=tmp_path)), rgb)
    np.testing.assert_array_equal(np.asarray(read_image(rgb, mode="L")), np.asarray(Image.fromarray(rgb).convert("L")))
    with pytest.raises(TypeError, match="cannot read an image from int"):
        read_image(3)
    with pytest.raises(ValueError, match="mode must be 'RGB' or 'L'"):
        read_image(rgb, mode="CMYK")


def test_to_uint8_and_to_pil():
    x = torch.tensor([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 0, 2, 128, 255, 255])  # clipped, rounded half to even
    np.testing.assert_array_equal(to_uint8(x.numpy()), to_uint8(x))
    img = torch.rand(2, 3, 4, 5)
    pil = to_pil(img)
    assert len(pil) == 2 and pil[0].size == (5, 4) and pil[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[1]), (img[1].permute(1, 2, 0).numpy() * 255).round())


def test_image_grid_layout():
    tiles = [[np.full((4, 4, 3), 10 * (i + j), np.uint8) for j in range(3)] for i in range(2)]
    g = image_grid(tiles, pad=1)
    assert g.shape == (9, 14, 3) and g[5, 5, 0] == 20 and g[4, 0, 0] == 255
    assert (g[5:9, 10:14] == 30).all() and (g[:, 4] == 255).all()
    b = image_grid(tiles, pad=1, border=1)  # border: the grid is framed
    assert b.shape == (11, 16, 3) and (b[0] == 255).all() and (b[:, -1] == 255).all()
    np.testing.assert_array_equal(b[1:-1, 1:-1], g)
    ragged = image_grid([[np.zeros((2, 2), np.uint8)], [np.zeros((2, 2, 4), np.uint8), Image.new("RGB", (2, 2))]])
    assert ragged.shape == (6, 6, 3) and (ragged[:2, 4:] == 255).all() and (ragged[4:, 4:] == 0).all()
    with pytest.raises(ValueError, match=r"tile \(0, 1\) is \(3, 3\)"):
        image_grid([[np.zeros((2, 2, 3), np.uint8), np.zeros((3, 3, 3), np.uint8)]])


def _readers():
    """Every image-reading entry point, each returning an HxWx3 (or HxW) uint8 array of a path."""
    from controlnet import cli
    from controlnet.canny import to_gray_uint8
    from controlnet.data import load_rgb
    from diffusion.training.data import ImageFolderDataset

    def folder(path):
        x = ImageFolderDataset(path.parent, size=None, channels=3)[0]["x"]
        return ((x + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()

    return {"cn-sample": lambda p: cli.read_image(str(p), "--image"), "controlnet.data": lambda p: np.asarray(
        load_rgb(p)), "image folder": folder, "canny": to_gray_uint8}


def test_every_reader_applies_exif_orientation(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    (tmp_path / "d").mkdir()
    im.save(tmp_path / "d" / "rot.png", exif=exif)
    for name, read in _readers().items():
        got = read(tmp_path / "d" / "rot.png")
        assert got.shape[:2] == (3, 2) and got[0, -1].max() == 255 and got[0, 0].max() == 0, name


def test_every_reader_refuses_an_image_over_the_pixel_limit(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "d" / "big.png")  # 1600 pixels: PIL alone only warns at limit 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for name, read in _readers().items():  # ValueErrors naming the error, or the reader's own DecompressionBombError
        with pytest.raises((ValueError, Image.DecompressionBombError), match=r"big\.png.*MAX_IMAGE_PIXELS") as e:
            read(tmp_path / "d" / "big.png")
        assert "DecompressionBombError" in f"{e.type.__name__}: {e.value}", name
