"""Image files no reader should decode, made byte by byte: a decompression-bomb PNG and truncated images.

A PNG is a signature and chunks (length, type, data, CRC-32 of type + data). The bomb's IHDR claims
`width` x `height` 1-bit grayscale pixels; its IDAT is a zlib stream of a few all-zero scanlines, so the file is
a few hundred bytes while a decoder would allocate width * height bytes (3.6 GB for 60000 x 60000) before it
found the stream short. A guard that reads the header first never gets that far.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOMB_SIDE = 60000  # 3.6e9 pixels: over our limit and over PIL's own hard limit (2 x 89.5 MP)
GRAY, BIT_DEPTH_1 = 0, 1  # IHDR colour type 0 (grayscale) at 1 bit per pixel: the smallest rows
SCANLINES = 16  # zero rows actually present in the IDAT


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A valid PNG header claiming width x height pixels, with a tiny IDAT (see the module docstring)."""
    ihdr = struct.pack(">IIBBBBB", width, height, BIT_DEPTH_1, GRAY, 0, 0, 0)  # compression, filter, interlace 0
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0 + packed bits
    idat = zlib.compress(row * SCANLINES, 9)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def noise_image(size: int = 64, seed: int = 0) -> Image.Image:
    """An RGB image that does not compress well, so that half of its file is half of its pixel data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def truncated(fmt: str = "PNG", size: int = 64) -> bytes:
    """A real image file cut in the middle of its pixel data."""
    data = encoded(noise_image(size), fmt)
    return data[: len(data) // 2]
