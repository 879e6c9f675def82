"""Trainable LoRA and TriLoRA layers that wrap a frozen ``nn.Linear`` or ``nn.Conv2d``.

LoRA:    y = W0·x + s · up · down · x                       (down [r, in·kh·kw], up [out, r])
TriLoRA: y = W0·x + s · B · C · A · x                        (A [r, in·kh·kw], C [r, r], B [out, r])

with ``s = alpha / r``. For a conv layer the first factor (``down`` / ``A``) is a conv with the layer's
kernel, stride and padding; the others are 1x1 convs, so the update has the layer's own shape.

TriLoRA initialisation (the founding paper, Fig. 1 and §3.3): ``svd`` (default) sets B = U_r and
C = diag(Σ_r) from the top-r SVD of W0 and A = 0; ``orthogonal`` sets B and Aᵀ to random
semi-orthogonal matrices and C = 0. Either way ΔW = 0 at step 0 and all three factors train.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loratool.core.modules import LoraModule

ADAPTERS = ("lora", "trilora")
TRILORA_INITS = ("svd", "orthogonal")
FOLDS = ("balanced", "bc")


class AdaptedLayer(nn.Module):
    """A frozen base layer plus a low-rank update (LoRA or TriLoRA)."""

    def __init__(self, base: nn.Module, kind: str, rank: int, alpha: float | None = None,
                 init: str = "svd", generator: torch.Generator | None = None) -> None:
        super().__init__()
        if kind not in ADAPTERS:
            raise ValueError(f"unknown adapter {kind!r}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise ValueError("grouped convolutions cannot be adapted")
        self.base, self.kind, self.rank = base, kind, rank
        self.alpha = float(rank if alpha is None else alpha)
        out_f, in_f = base.weight.shape[0], base.weight[0].numel()
        r = min(rank, out_f, in_f)
        self.rank = r
        if base.weight.is_meta:  # shapes only (a --dry-run trace): no values to initialise from
            shapes = {"lora": {"down": (r, in_f), "up": (out_f, r)},
                      "trilora": {"B": (out_f, r), "C": (r, r), "A": (r, in_f)}}[kind]
            for name, shape in shapes.items():
                setattr(self, name, nn.Parameter(torch.empty(shape, device="meta")))
            return
        w = base.weight.detach().float().cpu().reshape(out_f, in_f)
        if kind == "lora":
            down = torch.empty(r, in_f)
            bound = 1 / math.sqrt(in_f)  # kaiming-uniform(a=√5) bound, as nn.Linear's default init
            down.uniform_(-bound, bound, generator=generator)
            self.down = nn.Parameter(down)
            self.up = nn.Parameter(torch.zeros(out_f, r))
        else:
            if init == "svd":
                u, s, _ = torch.linalg.svd(w.double(), full_matrices=False)
                b, c, a = u[:, :r].float(), torch.diag(s[:r]).float(), torch.zeros(r, in_f)
            elif init == "orthogonal":
                b = torch.linalg.qr(torch.randn(out_f, r, generator=generator))[0]
                a = torch.linalg.qr(torch.randn(in_f, r, generator=generator))[0].T.contiguous()
                c = torch.zeros(r, r)
            else:
                raise ValueError(f"unknown TriLoRA init {init!r}")
            self.B, self.C, self.A = nn.Parameter(b), nn.Parameter(c), nn.Parameter(a)
        self.to(base.weight.device)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    def _first(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(x, m.to(x.dtype))
        b = self.base
        k = m.reshape(m.shape[0], *b.weight.shape[1:]).to(x.dtype)
        return F.conv2d(x, k, None, b.stride, b.padding, b.dilation)

    def _mix(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        m = m.to(h.dtype)
        return F.conv2d(h, m[:, :, None, None]) if self.is_conv else F.linear(h, m)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if self.kind == "lora":
            t, last = self._first(x, self.down), self.up
        else:
            t, last = self._mix(self._first(x, self.A), self.C), self.B
        if not self.is_conv and y.is_contiguous():
            # y + scale · t·lastᵀ as one product whose epilogue scales and adds (addmm): no separate
            # scale and add kernels, forward or backward (a step is bound by launches on many hosts)
            flat = torch.addmm(y.reshape(-1, y.shape[-1]), t.reshape(-1, t.shape[-1]), last.to(t.dtype).t(),
                               alpha=self.scale)
            return flat.view(y.shape)
        # the scale multiplies the rank-r intermediate, not the layer-sized output: one full-size pass less
        return y + self._mix(t * self.scale, last)

    def factors(self) -> dict[str, torch.Tensor]:
        """The trained matrices (2-D), by their native names."""
        if self.kind == "lora":
            return {"lora_down": self.down, "lora_up": self.up}
        return {"trilora_A": self.A, "trilora_B": self.B, "trilora_C": self.C}

    @torch.no_grad()
    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """ΔW in the base weight's shape."""
        if self.kind == "lora":
            d = self.up.to(dtype) @ self.down.to(dtype)
        else:
            d = self.B.to(dtype) @ self.C.to(dtype) @ self.A.to(dtype)
        return (self.scale * d).reshape(self.base.weight.shape)

    @torch.no_grad()
    def folded(self, fold: str = "balanced") -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, r], down [r, in·kh·kw]) with ``up @ down`` equal to the unscaled update.

        TriLoRA: ``bc`` gives up = B·C, down = A; ``balanced`` splits C = P·Q by its SVD
        (P = U·√Σ, Q = √Σ·Vᵀ) and gives up = B·P, down = Q·A, so both factors have similar norms.
        """
        if self.kind == "lora":
            return self.up.detach().float().clone(), self.down.detach().float().clone()
        b, c, a = (t.detach().double() for t in (self.B, self.C, self.A))
        if fold == "bc":
            return (b @ c).float(), a.float()
        if fold != "balanced":
            raise ValueError(f"unknown fold {fold!r}")
        u, s, vh = torch.linalg.svd(c)
        root = s.sqrt()
        return (b @ (u * root)).float(), ((root[:, None] * vh) @ a).float()

    def to_module(self, component: str, path: str, fold: str = "balanced") -> LoraModule:
        """The canonical (plain LoRA) module of this layer, TriLoRA folded."""
        up, down = self.folded(fold)
        if self.is_conv:
            down = down.reshape(down.shape[0], *self.base.weight.shape[1:])
            up = up[:, :, None, None]
        return LoraModule(component=component, path=path, down=down.contiguous(), up=up.contiguous(),
                          alpha=self.alpha)


def adapt(model: nn.Module, names: list[str], kind: str, rank: int, alpha: float | None,
          init: str, generator: torch.Generator) -> dict[str, AdaptedLayer]:
    """Replace each named Linear/Conv2d of ``model`` by an AdaptedLayer (in place); path -> layer."""
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = AdaptedLayer(base, kind, rank, alpha, init, generator)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_MLP = ("fc1", "fc2")
# --targets (the one vocabulary, loratool.arch.table.TARGET_SETS): which layers get an adapter.
#   attn              the attention projections: UNet to_q/to_k/to_v/to_out.0, text encoders q/k/v/out_proj
#                     (diffusers' DreamBooth-LoRA default);
#   transformer       every Linear and 1x1 conv of the UNet's transformer blocks (proj_in/proj_out and the
#                     feed-forward too) and the text encoders' attention and MLP (kohya's networks.lora);
#   transformer+conv  transformer, plus the ResNet blocks (3x3 convs, 1x1 shortcuts, time-embedding
#                     projections) and the down/upsampler convs (kohya's LoCon, conv_dim set);
#   all               every Linear and Conv2d (conv_in, conv_out, the time embedding, every text-encoder linear).
LAYER_SETS = ("attn", "transformer", "transformer+conv", "all")
UNET_LAYER_SETS = LAYER_SETS  # the name before the one vocabulary
OLD_UNET_LAYERS = {"attn": "attn", "transformer": "transformer", "all": "transformer+conv"}  # --unet-layers
_TRANSFORMER_BLOCKS = ("Transformer2DModel",)
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def _adaptable(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1)


def _inside(model: nn.Module, block_types: tuple[str, ...]) -> list[str]:
    """Names of the adaptable layers inside modules whose class name is one of ``block_types``."""
    out = []
    for prefix, block in model.named_modules():
        if type(block).__name__ in block_types:
            out += [f"{prefix}.{name}" for name, mod in block.named_modules() if name and _adaptable(mod)]
    return out


def target_names(model: nn.Module, component: str, layers: str = "attn") -> list[str]:
    """The layers a component's adapter covers, as ``layers`` (one of LAYER_SETS) says for the UNet and the
    text encoders; for the VAE, the decoder's attention projections and 3x3 convs."""
    if layers not in LAYER_SETS:
        raise ValueError(f"unknown layer set {layers!r}")
    adapted = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdaptedLayer))
    if component == "unet" and layers in ("transformer", "transformer+conv"):
        blocks = _TRANSFORMER_BLOCKS + (_CONV_BLOCKS if layers == "transformer+conv" else ())
        return sorted({n for n in _inside(model, blocks) if not f"{n}.".startswith(adapted)})
    out = []
    for name, mod in model.named_modules():
        if not name or isinstance(mod, AdaptedLayer) or f"{name}.".startswith(adapted):
            continue
        if component in ("unet", "text_encoder", "text_encoder_2") and layers == "all":
            keep = _adaptable(mod)
        elif component == "unet":
            keep = isinstance(mod, nn.Linear) and name.endswith(UNET_TARGETS)
        elif component.startswith("text_encoder"):
            ends = TEXT_TARGETS + (TEXT_MLP if layers != "attn" else ())
            keep = isinstance(mod, nn.Linear) and name.endswith(ends)
        else:
            keep = component == "vae" and name.startswith("decoder.") and (
                (isinstance(mod, nn.Linear) and name.endswith(UNET_TARGETS))
                or (isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3) and mod.groups == 1))
        if keep:
            out.append(name)
    return sorted(out)
