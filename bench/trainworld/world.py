"""A procedural image world: one flat shape on a plain background, with a caption.

Images are 32x32 RGB in [0, 1]. A scene is a shape, a colour, a size and a position on a 3x3 grid
(with a little jitter). Captions say what is there, e.g. "a small red circle at the top left"; during
pretraining some words are dropped ("a red circle", "a shape at the top") so that the model also knows
the generic noun "shape", the class word that DreamBooth's prior preservation needs.

The subject the base model never sees is a magenta *cross*: both the shape and the colour are new.
``detect`` reads a rendered or generated image back into (colour, shape, position) analytically, by
matching the foreground against rendered templates, so samples are judged by code, not by eye.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIZE = 32
SUPERSAMPLE = 4
BACKGROUND = (0.92, 0.92, 0.90)

BASE_COLOURS = {
    "red": (0.85, 0.15, 0.15),
    "green": (0.15, 0.65, 0.20),
    "blue": (0.15, 0.25, 0.85),
    "yellow": (0.90, 0.80, 0.10),
}
SUBJECT_COLOUR = ("magenta", (0.80, 0.10, 0.70))
COLOURS = {**BASE_COLOURS, SUBJECT_COLOUR[0]: SUBJECT_COLOUR[1]}

BASE_SHAPES = ("circle", "square", "triangle", "diamond")
SUBJECT_SHAPE = "cross"
SHAPES = (*BASE_SHAPES, SUBJECT_SHAPE)

SIZES = {"small": 4.5, "large": 8.0}
WHERE = {  # phrase -> (column, row) on the 3x3 grid
    "at the top left": (0, 0), "at the top": (1, 0), "at the top right": (2, 0),
    "on the left": (0, 1), "in the center": (1, 1), "on the right": (2, 1),
    "at the bottom left": (0, 2), "at the bottom": (1, 2), "at the bottom right": (2, 2),
}
CELL_CENTRES = (8.0, 16.0, 24.0)

# every word a prompt of this world may use (the tokenizer's whole-word vocabulary)
WORDS = sorted(
    {"a", "shape", "sks", "photo", "of", "dog", *COLOURS, *SHAPES, *SIZES}
    | {w for phrase in WHERE for w in phrase.split()}
)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    where: str
    dx: float = 0.0  # jitter in pixels
    dy: float = 0.0
    dr: float = 0.0

    def geometry(self) -> tuple[float, float, float]:
        col, row = WHERE[self.where]
        return CELL_CENTRES[col] + self.dx, CELL_CENTRES[row] + self.dy, SIZES[self.size] + self.dr

    def caption(self, drop: tuple[bool, bool, bool, bool] = (False,) * 4) -> str:
        """The full caption, or one with size / colour / position dropped and the shape generalised."""
        no_size, no_colour, no_where, generic = drop
        words = ["a"]
        if not no_size:
            words.append(self.size)
        if not no_colour:
            words.append(self.colour)
        words.append("shape" if generic else self.shape)
        if not no_where:
            words.append(self.where)
        return " ".join(words)


def all_shape_masks(geometry: torch.Tensor, size: int = SIZE, supersample: int = SUPERSAMPLE) -> torch.Tensor:
    """Coverage in [0, 1], ``[N, len(SHAPES), size, size]``, of every shape at each (cx, cy, r)."""
    n = geometry.shape[0]
    ss = size * supersample
    coords = (torch.arange(ss, dtype=torch.float32, device=geometry.device) + 0.5) / supersample
    cx, cy, r = (geometry[:, i].view(n, 1, 1) for i in range(3))
    dx = coords.view(1, 1, ss) - cx
    dy = coords.view(1, ss, 1) - cy
    ax, ay = dx.abs(), dy.abs()
    inside = torch.stack(
        [
            dx * dx + dy * dy <= r * r,  # circle
            torch.maximum(ax, ay) <= 0.85 * r,  # square
            (dy >= -r) & (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r)),  # triangle, apex up
            ax + ay <= r,  # diamond
            ((ax <= 0.33 * r) & (ay <= r)) | ((ay <= 0.33 * r) & (ax <= r)),  # cross
        ],
        dim=1,
    ).float()
    return F.avg_pool2d(inside.flatten(0, 1), supersample).view(n, len(SHAPES), size, size)


def shape_masks(shape_ids: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
    """Coverage ``[N, 32, 32]`` of each shape (an index into SHAPES) at its (cx, cy, r)."""
    return all_shape_masks(geometry)[torch.arange(len(shape_ids)), shape_ids]


def render(scenes: list[Scene], device: str | torch.device = "cpu") -> torch.Tensor:
    """Images ``[N, 3, 32, 32]`` in [0, 1]."""
    ids = torch.tensor([SHAPES.index(s.shape) for s in scenes], device=device)
    geo = torch.tensor([s.geometry() for s in scenes], dtype=torch.float32, device=device)
    cov = shape_masks(ids, geo).unsqueeze(1)
    colour = torch.tensor([COLOURS[s.colour] for s in scenes], device=device).view(-1, 3, 1, 1)
    bg = torch.tensor(BACKGROUND, device=device).view(1, 3, 1, 1)
    return bg * (1 - cov) + colour * cov


def random_scenes(n: int, gen: torch.Generator, shapes=BASE_SHAPES, colours=tuple(BASE_COLOURS)) -> list[Scene]:
    """``n`` scenes drawn uniformly from the base world (no subject), jittered by up to 1.5 px."""
    pick = torch.randint(0, 1 << 30, (n, 4), generator=gen).tolist()
    jit = (torch.rand(n, 3, generator=gen) * 2 - 1).tolist()
    where = list(WHERE)
    return [
        Scene(shapes[p[0] % len(shapes)], colours[p[1] % len(colours)], ("small", "large")[p[2] % 2],
              where[p[3] % len(where)], 1.5 * j[0], 1.5 * j[1], 0.5 * j[2])
        for p, j in zip(pick, jit, strict=False)
    ]


def random_captions(scenes: list[Scene], gen: torch.Generator, p_drop: float = 0.3,
                    p_generic: float = 0.2, p_empty: float = 0.1) -> list[str]:
    """Captions with attribute dropout (and some empty ones, for classifier-free guidance)."""
    u = torch.rand(len(scenes), 5, generator=gen).tolist()
    out = []
    for s, v in zip(scenes, u, strict=False):
        if v[4] < p_empty:
            out.append("")
        else:
            out.append(s.caption((v[0] < p_drop, v[1] < p_drop, v[2] < p_drop, v[3] < p_generic)))
    return out


@dataclass(frozen=True)
class Detection:
    colour: str  # nearest palette colour, "other" when none is close, "none" when nothing is drawn
    shape: str
    iou: float  # IoU of the foreground with the best-matching template
    cx: float
    cy: float
    r: float

    @property
    def where(self) -> str:
        col = min(range(3), key=lambda i: abs(CELL_CENTRES[i] - self.cx))
        row = min(range(3), key=lambda i: abs(CELL_CENTRES[i] - self.cy))
        return next(k for k, v in WHERE.items() if v == (col, row))

    @property
    def is_subject(self) -> bool:
        return self.colour == SUBJECT_COLOUR[0] and self.shape == SUBJECT_SHAPE and self.iou >= 0.6


NOTHING = Detection("none", "none", 0.0, 16.0, 16.0, 0.0)


def detect(image: torch.Tensor) -> Detection:
    """Read one image ``[3, 32, 32]`` in [0, 1] back into what it shows."""
    img = image.float().cpu().clamp(0, 1)
    bg = torch.tensor(BACKGROUND).view(3, 1, 1)
    diff = (img - bg).abs().amax(dim=0)
    if int((diff > 0.25).sum()) < 6:
        return NOTHING
    fg = diff >= 0.5 * float(diff.max())  # pixels at least half covered
    core = diff >= 0.8 * float(diff.max())
    mean = img[:, core].mean(dim=1)
    names = list(COLOURS)
    dist = torch.stack([(mean - torch.tensor(COLOURS[c])).norm() for c in names])
    colour = names[int(dist.argmin())] if float(dist.min()) < 0.3 else "other"
    ys, xs = torch.nonzero(fg, as_tuple=True)
    x0, x1, y0, y1 = float(xs.min()), float(xs.max()) + 1, float(ys.min()), float(ys.max()) + 1
    half = max(x1 - x0, y1 - y0) / 2
    cands = [((x0 + x1) / 2 + ox, (y0 + y1) / 2 + oy, half * f)
             for ox in (-1, 0, 1) for oy in (-1.5, -0.5, 0.5, 1.5) for f in (0.9, 1.0, 1.1, 1.2)]
    masks = all_shape_masks(torch.tensor(cands)) > 0.5
    inter = (masks & fg).flatten(2).sum(2).float()
    union = (masks | fg).flatten(2).sum(2).float()
    iou = (inter / union).flatten()
    i = int(iou.argmax())
    cx, cy, r = cands[i // len(SHAPES)]
    return Detection(colour, SHAPES[i % len(SHAPES)], float(iou[i]), cx, cy, r)


def saturated_fraction(images: torch.Tensor) -> float:
    """Share of channel values pinned at the ends of the range (no colour of this world is)."""
    return float(((images <= 0.02) | (images >= 0.98)).float().mean())


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance between samples (0 when every sample is the same image)."""
    flat = images.flatten(1).float()
    d = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1))) if n > 1 else 0.0
