"""Token embeddings carried by an adapter, as textual-inversion files (A1111 and diffusers'
``load_textual_inversion`` read the key ``emb_params``, shape ``[vectors, dim]``)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch


def embedding_paths(output: Path, tokens: Iterable[str]) -> dict[str, Path]:
    """Where ``convert`` puts each token's file: ``<output stem>.<token>.safetensors`` beside the output,
    the token reduced to letters, digits, ``_`` and ``-`` (so ``<s1>`` and ``s1`` share a name: the
    output writer refuses such a clash)."""
    stem = output.name if output.suffix == "" else output.stem
    out = {}
    for token in tokens:
        safe = re.sub(r"[^A-Za-z0-9_-]+", "", token) or "token"
        out[token] = output.parent / f"{stem}.{safe}.safetensors"
    return out


def textual_inversion(embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a textual-inversion file for one token: ``emb_params [n, dim]`` (a ``[dim]``
    vector becomes one row)."""
    emb = embedding.detach()
    emb = emb.reshape(1, -1) if emb.dim() == 1 else emb
    return {"emb_params": emb.contiguous()}
