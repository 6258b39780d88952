"""A decoded PIL image's pixels as a numpy array without copying them.

PIL keeps an RGB image as 4 bytes per pixel (RGBX). Its usual exports (`np.asarray`, `tobytes`)
repack that into 3-byte pixels through its encoder, which for a 224 px image costs about a tenth of
decoding it (bench/data.py). Pillow (11.2+) also exports images through the Arrow C data interface,
a stable C ABI: a fixed-size list of 4 uint8 per pixel, pointing at PIL's own memory. This module
reads that pointer and wraps it as an (H, W, 4) uint8 view, so that a dataloader worker copies only
the crop it ships, once. Images Pillow cannot export in one block (above its 16 MiB block size)
take the copying path.
"""

from __future__ import annotations

import ctypes

import numpy as np
from PIL import Image


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [  # struct ArrowArray of the Arrow C data interface
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.POINTER(_ArrowArray)),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]

_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


class _Exported:
    """Holds the Arrow export (and so PIL's memory) alive for as long as a numpy view of it exists."""

    def __init__(self, image: Image.Image):
        self.capsules = image.__arrow_c_array__()  # released when this object goes
        array = _ArrowArray.from_address(_capsule_pointer(self.capsules[1], b"arrow_array"))
        values = array.children[0].contents  # the uint8 child of the per-pixel fixed-size list
        if array.offset or values.offset:
            raise ValueError("an Arrow export with an offset")
        self.__array_interface__ = {
            "data": (values.buffers[1], True),
            "shape": (image.height, image.width, 4),
            "typestr": "|u1",
            "version": 3,
        }


def rgbx(image: Image.Image) -> np.ndarray:
    """A loaded RGB image's pixels, (H, W, 4) uint8 (R, G, B, 255): a read-only view of PIL's memory
    when Pillow exports it in one block, else a copy."""
    if image.mode != "RGB":
        raise ValueError(f"rgbx takes an RGB image, got mode {image.mode!r}")
    try:
        return np.asarray(_Exported(image))
    except (AttributeError, ValueError):  # an older Pillow, or an image in several blocks
        data = np.frombuffer(image.tobytes("raw", "RGBX"), dtype=np.uint8)
        return data.reshape(image.height, image.width, 4)
