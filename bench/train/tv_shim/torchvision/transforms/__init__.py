"""The transforms diffusers' DreamBooth scripts compose, on PIL images (see the package docstring)."""

from __future__ import annotations

import enum
import random

import torch

from . import functional  # noqa: F401


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _pil_filter(mode: InterpolationMode):
    from PIL import Image

    return {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[mode.value]


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


class Resize:
    """Shorter side to ``size`` (an int), keeping the aspect ratio."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image):
        w, h = image.size
        s = self.size / min(w, h)
        return image.resize((max(1, round(w * s)), max(1, round(h * s))), _pil_filter(self.interpolation))


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, image):
        h, w = self.size
        left, top = (image.width - w) // 2, (image.height - h) // 2
        return image.crop((left, top, left + w, top + h))


class RandomCrop(CenterCrop):
    @staticmethod
    def get_params(image, size):
        h, w = size
        top, left = random.randint(0, image.height - h), random.randint(0, image.width - w)
        return top, left, h, w

    def __call__(self, image):
        top, left, h, w = self.get_params(image, self.size)
        return image.crop((left, top, left + w, top + h))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image):
        from PIL import Image

        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else image


class ToTensor:
    def __call__(self, image):
        t = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
        return t.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255.0


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (t - mean) / std
