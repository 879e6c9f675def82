"""Our single-file <-> diffusers maps against diffusers' own single-file converters (a second opinion).

Each checkpoint tensor is replaced by a thin [rows, 1, ...] tensor whose values encode (key index, row), so
the converters' splits, concatenations, swaps and transposes can be read back from what they return.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from loratool.arch import load_arch

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
gen = pytest.importorskip("gen_arch_tables")

TAG = 2**16  # > any row count of a tagged tensor; a power of two keeps the float64 decoding exact


def tagged(arch, component: str) -> tuple[list[str], dict[str, torch.Tensor]]:
    keys = sorted(k for k, ps in arch.checkpoint_params.items() if ps[0].component == component)
    state = {}
    for i, key in enumerate(keys):
        shape = arch.checkpoint_shape(key)
        values = torch.arange(shape[0] if shape else 1, dtype=torch.float64) + i * TAG
        state[key] = values.reshape(shape[0], *([1] * (len(shape) - 1))) if shape else values[0]
    return keys, state


def assert_same_map(arch, component: str, converted: dict[str, torch.Tensor], keys: list[str]) -> None:
    ours = arch.diffusers_param_map(component)
    assert {name for _, name in ours} == set(converted)
    for (_, name), p in ours.items():
        t = converted[name].t() if p.op == "T" else converted[name]
        values = t.reshape(t.shape[0], -1)[:, 0] if t.ndim else t.reshape(1)
        index = torch.div(values, TAG, rounding_mode="floor").long()
        rows = (values - index * TAG).long()
        full = arch.checkpoint_shape(p.checkpoint_key)
        if p.rows:
            want = torch.cat([torch.arange(a, b) for a, b in p.rows])
        else:
            want = torch.arange(full[0] if full else 1)
        assert set(index.tolist()) == {keys.index(p.checkpoint_key)}, name
        assert torch.equal(rows, want), name


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_unet_and_vae_maps_match_diffusers_converters(kind):
    arch = load_arch(kind)
    with torch.device("meta"):
        unet, vae = gen._sd_unet(kind), gen._vae(4)
    keys, state = tagged(arch, "unet")
    assert_same_map(arch, "unet", sfu.convert_ldm_unet_checkpoint(state, dict(unet.config)), keys)
    keys, state = tagged(arch, "vae")
    assert_same_map(arch, "vae", sfu.convert_ldm_vae_checkpoint(state, dict(vae.config)), keys)


@pytest.mark.parametrize(("kind", "component", "prefix"), [
    ("sd2", "text_encoder", "cond_stage_model.model."),
    ("sdxl", "text_encoder_2", "conditioner.embedders.1.model."),
])
def test_openclip_maps_match_diffusers_converter(kind, component, prefix):
    arch = load_arch(kind)
    with torch.device("meta"):
        te = gen._clip(1024, 4096, 23, 16) if kind == "sd2" else gen._clip(1280, 5120, 32, 20, projection=1280)
    keys, state = tagged(arch, component)
    assert_same_map(arch, component, sfu.convert_open_clip_checkpoint(te, state, prefix=prefix), keys)


@pytest.mark.parametrize(("kind", "convert"), [
    ("flux", "convert_flux_transformer_checkpoint_to_diffusers"),
    ("sd3", "convert_sd3_transformer_checkpoint_to_diffusers"),
])
def test_dit_maps_match_diffusers_converters(kind, convert):
    arch = load_arch(kind)
    keys, state = tagged(arch, "transformer")
    assert_same_map(arch, "transformer", getattr(sfu, convert)(state), keys)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl", "flux", "sd3"])
def test_committed_tables_are_what_the_generator_writes(kind):
    data = Path(__file__).resolve().parents[2] / "loratool" / "arch" / "data" / "tables" / f"{kind}.json"
    assert gen.dump(gen.build(kind)) + "\n" == data.read_text(), "run python tools/gen_arch_tables.py"
