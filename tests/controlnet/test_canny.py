"""Canny condition and edge-F1 tests (ControlNet, Zhang, Rao & Agrawala 2023)."""
import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from controlnet.canny import canny, edge_f1


def square(size=64, lo=8, hi=40, shift=0):
    img = np.zeros((size, size), np.uint8)
    img[lo + shift:hi + shift, lo:hi] = 255
    return img


def test_output_format_and_resize():
    img = data.astronaut()  # 512x512x3 uint8
    e = canny(img)
    assert e.shape == (512, 512, 3) and e.dtype == np.uint8
    assert set(np.unique(e)) <= {0, 255} and (e[..., 0] == e[..., 2]).all() and e.any()
    assert canny(img, size=(96, 128)).shape == (96, 128, 3)
    assert canny(img, size=(768, 640)).shape == (768, 640, 3)
    assert canny(np.zeros((10, 7), np.uint8)).shape == (10, 7, 3)
    assert canny(img, low=50, high=100).sum() > canny(img, low=150, high=300).sum()
    with pytest.raises(ValueError, match="low"):
        canny(img, low=200, high=100)


def test_all_input_kinds_give_the_same_edges(tmp_path):
    rgb = data.astronaut()
    ref = canny(rgb)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "a16.png"), cv2.cvtColor(rgb.astype(np.uint16) * 257, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "a_rgba.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    Image.fromarray(rgba).save(tmp_path / "pil_rgba.png")
    variants = {
        "pil": Image.fromarray(rgb), "pil_rgba": Image.fromarray(rgba), "rgba": rgba,
        "u16": rgb.astype(np.uint16) * 257, "float": rgb / 255.0, "path": str(tmp_path / "a.png"),
        "pathlib": tmp_path / "a.png", "path16": tmp_path / "a16.png", "path_rgba": tmp_path / "a_rgba.png",
        "pil_file": Image.open(tmp_path / "pil_rgba.png"), "palette": Image.fromarray(rgb).convert("P", colors=256),
    }
    for name, v in variants.items():
        if name == "palette":
            continue  # lossy quantisation; only check it runs
        assert np.array_equal(canny(v), ref), name
    assert canny(variants["palette"]).shape == ref.shape

    gray = data.camera()  # 512x512 uint8 grayscale
    gref = canny(gray)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # PIL mode I;16 / I
    gvariants = [gray[..., None], np.dstack([gray] * 3), Image.fromarray(gray), tmp_path / "g.png",
                 tmp_path / "g16.png", Image.open(tmp_path / "g16.png"), gray.astype(np.uint16) * 257]
    for i, v in enumerate(gvariants):
        assert np.array_equal(canny(v), gref), i


def test_unreadable_file_error_names_the_file(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="not_an_image.png"):
        canny(bad)
    with pytest.raises(ValueError, match="missing.png"):
        canny(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="shape"):
        canny(np.zeros((4, 4, 2), np.uint8))


def test_edge_f1_on_synthetic_square():
    img = square()
    edges = canny(img)
    assert edges.any()
    assert edge_f1(edges, img) == 1.0
    shifted = square(shift=1)
    assert edge_f1(edges, shifted, tolerance=2) == 1.0
    assert edge_f1(edges, shifted, tolerance=1) == 1.0
    assert edge_f1(edges, shifted, tolerance=0) < 1.0
    assert edge_f1(edges, np.zeros_like(img)) == 0.0
    assert edge_f1(canny(np.zeros_like(img)), np.zeros_like(img)) == 1.0
    assert edge_f1(edges, square(shift=6), tolerance=2) < 0.8


def test_edge_f1_on_natural_images():
    img = data.astronaut()
    edges = canny(img, size=(256, 256))
    assert edge_f1(edges, img) == 1.0  # generated image is resized to the condition's resolution
    resized = Image.fromarray(img).resize((256, 256), Image.BILINEAR)  # same content, other resampler
    related = [edge_f1(edges, resized, tolerance=t) for t in (0, 1, 2)]
    unrelated = [edge_f1(edges, data.camera(), tolerance=t) for t in (0, 1, 2)]
    assert related == sorted(related) and unrelated == sorted(unrelated)  # more tolerance, higher F1
    assert min(related) > 0.85 and max(unrelated) < 0.6 and unrelated[0] < 0.2
