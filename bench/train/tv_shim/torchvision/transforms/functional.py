"""torchvision.transforms.functional.crop, for PIL images."""

from __future__ import annotations


def crop(image, top: int, left: int, height: int, width: int):
    return image.crop((left, top, left + width, top + height))
