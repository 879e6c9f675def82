"""The canonical adapter model: one record per adapted layer, whatever file layout it came from.

Shapes follow the layer's weight. A linear layer has weight ``[out, in]``; a conv layer
``[out, in, kh, kw]``. LoRA factors are stored as kohya stores them:

* linear: ``down [r, in]``, ``up [out, r]``;
* conv kxk: ``down [r, in, kh, kw]`` (a conv with the layer's kernel), ``up [out, r, 1, 1]``;
* conv 1x1: ``down [r, in, 1, 1]``, ``up [out, r, 1, 1]``;
* Tucker / LoCon-CP conv: ``down [r, in, 1, 1]``, ``mid [r, r, kh, kw]``, ``up [out, r, 1, 1]``.

The scale is explicit: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA); ``alpha=None`` means
"no alpha stored", which every loader treats as scale 1.

Every module can produce its dense update ``delta()`` in the weight's shape. The math here is
what web UIs apply (reference/webui.md §3.4, §6.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch

from loratool.core.module_set import ModuleSet

if TYPE_CHECKING:
    from loratool.arch.detect import Detection

DoraAxis = Literal["out", "in"]


def flat2d(t: torch.Tensor) -> torch.Tensor:
    """A weight or factor as a matrix: ``[rows, prod(rest)]``."""
    return t.reshape(t.shape[0], -1)


@dataclass
class Dora:
    """DoRA weight-decomposition magnitude.

    ``magnitude`` has the weight's number of dims with singletons: ``(out, 1[, 1, 1])`` when the
    norm is taken per output row (``axis='out'``, PEFT and LyCORIS >= 3.2), ``(1, in[, 1, 1])``
    per input column (``axis='in'``, older LyCORIS and A1111).
    """

    magnitude: torch.Tensor
    axis: DoraAxis

    def apply(self, weight: torch.Tensor, delta: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
        """The adapted weight ``m * (W + ΔW) / ‖W + ΔW‖`` along this axis."""
        merged = weight + delta
        m2 = flat2d(merged) if self.axis == "out" else flat2d(merged.transpose(0, 1))
        norm = m2.norm(dim=1)
        shape = [1] * merged.dim()
        shape[0 if self.axis == "out" else 1] = -1
        mag = self.magnitude.reshape(shape).to(merged.dtype)
        return merged * (mag / (norm.reshape(shape) + eps))


@dataclass
class ModuleBase:
    """What every adapted layer has: where it is and how strongly it applies."""

    component: str  # unet, text_encoder, text_encoder_2, transformer, vae, model (generic)
    path: str  # module path inside the component, diffusers naming (no ".weight")
    alpha: float | None = None
    dora: Dora | None = None
    bias: torch.Tensor | None = None  # a change to the layer's bias (LyCORIS diff_b / PEFT lora bias)

    @property
    def key(self) -> str:
        return f"{self.component}.{self.path}" if self.component else self.path

    kind: str = field(default="", init=False)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors())


@dataclass
class LoraModule(ModuleBase):
    """Plain LoRA / LoCon: ``ΔW = scale · up · [mid] · down``."""

    down: torch.Tensor = None  # type: ignore[assignment]
    up: torch.Tensor = None  # type: ignore[assignment]
    mid: torch.Tensor | None = None
    rslora: bool = False

    def __post_init__(self) -> None:
        self.kind = "lora"
        if self.down is None or self.up is None:
            raise ValueError("a LoRA module needs both down and up")
        down, up, mid = tuple(self.down.shape), tuple(self.up.shape), self.mid
        if len(down) < 2 or len(up) < 2:
            raise ValueError(f"{self.key}: up {up} and down {down}: each factor needs at least two dims")
        if mid is None and up[1] != down[0]:
            raise ValueError(f"{self.key}: up {up} and down {down} disagree on the rank")
        if down[0] < 1:
            raise ValueError(f"{self.key}: up {up} and down {down} have rank 0")
        if any(s != 1 for s in up[2:]):
            raise ValueError(f"{self.key}: up {up} with down {down}: a conv's kernel belongs in down, up is 1x1")
        if mid is not None and (mid.dim() < 2 or tuple(mid.shape[:2]) != (up[1], down[0])
                                or any(s != 1 for s in down[2:])):
            raise ValueError(f"{self.key}: up {up}, mid {tuple(mid.shape)} and down {down} do not chain")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """The factor ``ΔW`` carries beyond ``up @ down``: ``alpha/r`` (rsLoRA ``alpha/√r``); 1 without alpha."""
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        out = int(self.up.shape[0])
        if self.down.dim() == 2:
            return (out, int(self.down.shape[1]))
        kernel = tuple(self.mid.shape[2:]) if self.mid is not None else tuple(self.down.shape[2:])
        return (out, int(self.down.shape[1]), *map(int, kernel))

    def product(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``up · [mid] · down`` without the scale, in the weight's shape."""
        up = flat2d(self.up).to(dtype)
        if self.mid is None:
            return (up @ flat2d(self.down).to(dtype)).reshape(self.weight_shape)
        down = flat2d(self.down).to(dtype)  # [r, in]
        mid = self.mid.to(dtype)  # [r_up, r_down, kh, kw]
        return torch.einsum("ijhw,oi,jc->ochw", mid, up, down)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.product(dtype) * self.scale

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.down, self.up, self.mid) if t is not None]

    def with_factors(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> LoraModule:
        """A copy with new factors (and no Tucker core)."""
        return replace(self, down=down, up=up, mid=None, alpha=alpha, rslora=False)


def _hadamard_factor(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, dtype) -> torch.Tensor:
    """One LoHa factor: ``a @ b`` flat, or the Tucker form rebuilt from ``t``."""
    if t is None:
        return flat2d(a).to(dtype) @ flat2d(b).to(dtype)
    # Tucker: t [r, r, kh, kw], a [r, out], b [r, in]
    return torch.einsum("ijhw,io,jc->ochw", t.to(dtype), a.to(dtype), b.to(dtype))


@dataclass
class LohaModule(ModuleBase):
    """LyCORIS LoHa: ``ΔW = scale · (w1a·w1b) ⊙ (w2a·w2b)``, rank = rows of ``w1b``."""

    w1a: torch.Tensor = None  # type: ignore[assignment]
    w1b: torch.Tensor = None  # type: ignore[assignment]
    w2a: torch.Tensor = None  # type: ignore[assignment]
    w2b: torch.Tensor = None  # type: ignore[assignment]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    shape: tuple[int, ...] = ()  # the layer's weight shape, when the factors do not pin it down

    def __post_init__(self) -> None:
        self.kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.shape:
            return tuple(self.shape)
        if self.t1 is not None:
            return (int(self.w1a.shape[1]), int(self.w1b.shape[1]), *map(int, self.t1.shape[2:]))
        return (int(self.w1a.shape[0]), int(flat2d(self.w1b).shape[1]))

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        f1 = _hadamard_factor(self.w1a, self.w1b, self.t1, dtype)
        f2 = _hadamard_factor(self.w2a, self.w2b, self.t2, dtype)
        return (f1 * f2 * self.scale).reshape(self.weight_shape)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2) if t is not None]


@dataclass
class LokrModule(ModuleBase):
    """LyCORIS LoKr: ``ΔW = scale · kron(w1, w2)``; each side whole or as a product of two factors.

    ``scale = alpha / r`` where r is the rank of a decomposed side; when both sides are stored
    whole, every UI ignores alpha (scale 1), and so do we.
    """

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.kind = "lokr"
        if (self.w1 is None) == (self.w1a is None or self.w1b is None):
            raise ValueError(f"{self.key}: LoKr needs lokr_w1 or lokr_w1_a + lokr_w1_b")
        if self.w2 is None and (self.w2a is None or self.w2b is None):
            raise ValueError(f"{self.key}: LoKr needs lokr_w2 or lokr_w2_a + lokr_w2_b")

    @property
    def rank(self) -> int | None:
        if self.w1b is not None:
            return int(self.w1b.shape[0])
        if self.w2b is not None:
            return int(self.w2b.shape[0])
        return None

    @property
    def scale(self) -> float:
        if self.alpha is None or self.rank is None:
            return 1.0
        return self.alpha / self.rank

    def _w1(self, dtype) -> torch.Tensor:
        if self.w1 is not None:
            return self.w1.to(dtype)
        return self.w1a.to(dtype) @ self.w1b.to(dtype)

    def _w2(self, dtype) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.to(dtype)
        if self.t2 is not None:  # t2 [r, r, kh, kw], w2a [r, b], w2b [r, d]
            return torch.einsum("ijhw,ib,jd->bdhw", self.t2.to(dtype), self.w2a.to(dtype), self.w2b.to(dtype))
        return flat2d(self.w2a).to(dtype) @ flat2d(self.w2b).to(dtype)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.shape:
            return tuple(self.shape)
        w1 = self._w1(torch.float32) if self.w1 is None else self.w1
        w2 = self._w2(torch.float32)
        return (int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * w2.shape[1]), *map(int, w2.shape[2:]))

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w1 = self._w1(dtype)
        w2 = self._w2(dtype)
        shape = self.weight_shape
        # a flat conv side [b, d·kh·kw]: the 2-D kron reshaped to the weight is LyCORIS' rebuild, and
        # also right when w1's columns do not divide in (old LyCORIS factors in·kh·kw as a whole)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        # kron views its inputs: the Tucker einsum gives a permuted (non-contiguous) w2
        return (torch.kron(w1.contiguous(), w2.contiguous()) * self.scale).reshape(shape)

    def tensors(self) -> list[torch.Tensor]:
        parts = (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2)
        return [t for t in parts if t is not None]


class _StoredDelta:
    """Shared by the kinds that store their ΔW as it is (no factors, no scale)."""

    @property
    def rank(self) -> None:
        return None

    @property
    def scale(self) -> float:
        return 1.0

    def _stored(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self._stored().shape)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._stored().to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self._stored(), self.bias) if t is not None]


@dataclass
class FullModule(_StoredDelta, ModuleBase):
    """LyCORIS full / plain weight difference: ``ΔW = diff`` (alpha plays no part)."""

    diff: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.kind = "full"

    def _stored(self) -> torch.Tensor:
        return self.diff


@dataclass
class NormModule(_StoredDelta, ModuleBase):
    """LyCORIS norm training: additive changes to a LayerNorm/GroupNorm weight and bias."""

    w_norm: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.kind = "norm"

    def _stored(self) -> torch.Tensor:
        return self.w_norm

    @property
    def is_conv(self) -> bool:
        return False


Module = LoraModule | LohaModule | LokrModule | FullModule | NormModule


@dataclass
class Adapter(ModuleSet):
    """A whole adapter file in canonical form.

    ``modules`` is keyed by ``module.key`` (``component.path``). ``embeddings`` holds token
    embeddings carried in the file (cloneofsimo, pivotal tuning): token -> ``[n, dim]``.
    ``unknown`` lists the keys no codec recognised; they are reported, never silently dropped.
    ``source_format`` is the layout the file was read in (a list when it mixes several): the same names
    ``--to`` accepts. ``detection`` says how ``base_model`` was decided (keys, metadata, candidates).
    """

    modules: dict[str, Module] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    base_model: str = "unknown"  # sd1, sd2, sdxl, flux, sd3, unknown
    source_format: str = ""
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)
    unknown_reasons: dict[str, str] = field(default_factory=dict)  # key -> why no codec could place it
    detection: Detection | None = None  # how base_model was decided (set by the reader)
    path: str = field(default="", compare=False)  # the file or folder it was read from ("" when built in memory)

    def add(self, module: Module) -> None:
        if module.key in self.modules:
            raise ValueError(f"module {module.key} appears twice")
        self.modules[module.key] = module
