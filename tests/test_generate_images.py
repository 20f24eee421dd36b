"""Images `generate` is given: over Pillow's pixel limit, or not 8-bit RGB (grayscale, CMYK, 16-bit, floating point)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_refused, vlmopt_json
from vlmopt.samples import sample_image


@pytest.fixture(scope="module")
def llava(exported: Callable[[str], Path]) -> Path:
    return exported("llava")


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` pixels (what Pillow's limit reads) in a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_an_image_over_pillows_pixel_limit_is_refused_in_one_line(llava: Path, tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 20000, 20000)

    assert_refused(llava, "generate", "--image", bomb, "--prompt", "Describe.", fragments=("bomb.png", "400000000 pixels", "limit"))


def test_a_floating_point_image_is_refused_in_one_line(llava: Path, tmp_path: Path) -> None:
    path = tmp_path / "float.tiff"
    Image.fromarray(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)).save(path)

    assert_refused(llava, "generate", "--image", path, "--prompt", "Describe.", fragments=("floating-point", "8-bit"))


@pytest.mark.parametrize(("mode", "suffix", "said"), [("L", "png", "L -> RGB"), ("CMYK", "jpg", "CMYK -> RGB"), ("I;16", "png", "scaled to 8 bits")])
def test_grayscale_cmyk_and_16_bit_images_are_converted_and_the_result_says_so(llava: Path, tmp_path: Path, mode: str, suffix: str, said: str) -> None:
    path = tmp_path / f"picture.{suffix}"
    picture = sample_image(5, size=64)
    if mode == "I;16":
        Image.fromarray(np.asarray(picture.convert("L"), dtype=np.uint16) * 257).save(path)
    else:
        picture.convert(mode).save(path)

    result = vlmopt_json("generate", llava, "--image", path, "--prompt", "Describe.", "--max-new-tokens", 2)

    assert len(result["image_conversions"]) == 1 and said in result["image_conversions"][0]
    assert len(result["tokens"]) >= 1


def test_a_16_bit_image_reads_as_the_same_picture_as_its_8_bit_copy(tmp_path: Path) -> None:
    from vlmopt.calibration import read_image

    gray = np.asarray(sample_image(6, size=64).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    Image.fromarray(gray).save(tmp_path / "plain.png")

    deep, _ = read_image(tmp_path / "deep.png", "the")
    plain, _ = read_image(tmp_path / "plain.png", "the")

    assert np.array_equal(np.asarray(deep), np.asarray(plain))
