"""merge: W + w·ΔW on every target (fused rows, layouts, DoRA), everything else byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratool.core.modules import Adapter, Dora, LoraModule
from loratool.errors import LoraToolError
from loratool.io.safetensors import SafetensorsFile
from loratool.io.writer import write_safetensors
from loratool.ops.merge import Application, Placement, apply_to_tensor
from loratool.ops.merge_stream import merge_checkpoint
from loratool.ops.mix import MixInput

UNET_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
UNET_CONV = "unet.down_blocks.0.resnets.0.conv1"
TE_Q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
SD1_KEYS = {
    UNET_Q: "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    UNET_CONV: "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
    TE_Q: "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
}
SHAPES = {UNET_Q: (320, 320), UNET_CONV: (320, 320, 3, 3), TE_Q: (768, 768)}


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lora(key: str, shape: tuple[int, ...], rank: int, alpha: float, seed: int) -> LoraModule:
    g = _g(seed)
    comp, path = key.split(".", 1)
    down = torch.randn(rank, *shape[1:], generator=g) * 0.05
    up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.05
    return LoraModule(component=comp, path=path, alpha=alpha, down=down, up=up)


def _adapter(*mods: LoraModule, base: str = "sd1") -> Adapter:
    a = Adapter(base_model=base)
    for m in mods:
        a.add(m)
    return a


def _checkpoint(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = _g(0)
    tensors = {ck: torch.randn(*SHAPES[k], generator=g).to(dtype) for k, ck in SD1_KEYS.items()}
    tensors["model.diffusion_model.input_blocks.1.0.in_layers.2.bias"] = torch.randn(320, generator=g).to(dtype)
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g).to(dtype)
    tensors["alphas_cumprod"] = torch.linspace(1, 0, 1000, dtype=torch.float32)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    write_safetensors(path, tensors, {"format": "pt", "note": "tiny"})
    return tensors


def _read(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.get(k).clone() for k in f.keys()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_single_file(tmp_path: Path, dtype: torch.dtype) -> None:
    src = tmp_path / "model.safetensors"
    before = _checkpoint(src, dtype)
    lora = _adapter(*(_lora(k, SHAPES[k], 4, 2.0, n) for n, k in enumerate(SHAPES)))
    lora2 = _adapter(_lora(UNET_Q, SHAPES[UNET_Q], 8, 8.0, 9))
    out = tmp_path / "baked.safetensors"
    report = merge_checkpoint(src, [MixInput(lora, 0.8, name="a"), MixInput(lora2, -0.3, name="b")], out, arch="sd1")
    assert report["matched_modules"] == 4 and report["unmatched_modules"] == 0 and report["tensors_written"] == 3
    after = _read(out)
    assert list(after) == list(_read(src)) and set(after) == set(before)
    for key, ckey in SD1_KEYS.items():
        want = before[ckey].double() + 0.8 * lora.modules[key].delta(torch.float64)
        if key == UNET_Q:
            want = want - 0.3 * lora2.modules[key].delta(torch.float64)
        assert after[ckey].dtype == dtype
        if dtype == torch.float32:
            assert float((after[ckey].double() - want).abs().max()) < 1e-5
        else:  # within one fp16 rounding of the exact value
            assert torch.allclose(after[ckey].double(), want, rtol=2**-10, atol=2**-24)
        assert not torch.equal(after[ckey], before[ckey])
    for key in set(before) - set(SD1_KEYS.values()):
        with SafetensorsFile(src) as a, SafetensorsFile(out) as b:
            assert bytes(a.get(key).reshape(-1).view(torch.uint8).numpy()) == bytes(
                b.get(key).reshape(-1).view(torch.uint8).numpy()), key
    with SafetensorsFile(out) as f:
        assert f.metadata["note"] == "tiny" and f.metadata["loratool.command"] == "merge"


def test_negative_weight_unmerges(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    before = _checkpoint(src, torch.float32)
    lora = _adapter(*(_lora(k, SHAPES[k], 4, 2.0, n) for n, k in enumerate(SHAPES)))
    merge_checkpoint(src, [MixInput(lora, 1.0)], tmp_path / "a.safetensors", arch="sd1")
    merge_checkpoint(tmp_path / "a.safetensors", [MixInput(lora, -1.0)], tmp_path / "b.safetensors", arch="sd1")
    back = _read(tmp_path / "b.safetensors")
    for ck in SD1_KEYS.values():
        assert float((back[ck] - before[ck]).abs().max()) < 1e-6


def test_unmatched_dry_run_and_allow(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    _checkpoint(src, torch.float16)
    extra = _lora("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (640, 768), 2, 2.0, 3)
    lora = _adapter(_lora(UNET_Q, SHAPES[UNET_Q], 4, 2.0, 1), extra)
    out = tmp_path / "o.safetensors"
    with pytest.raises(LoraToolError, match="1 of 2 LoRA modules.*attn2.to_k.*allow-unmatched"):
        merge_checkpoint(src, [MixInput(lora, 1.0, name="x")], out, arch="sd1")
    assert not out.exists()
    report = merge_checkpoint(src, [MixInput(lora, 1.0)], out, arch="sd1", dry_run=True, allow_unmatched=True)
    assert (report["matched_modules"], report["unmatched_modules"]) == (1, 1) and not out.exists()
    merge_checkpoint(src, [MixInput(lora, 1.0)], out, arch="sd1", allow_unmatched=True)
    assert out.exists()
    with pytest.raises(LoraToolError, match="exists"):
        merge_checkpoint(src, [MixInput(lora, 1.0)], out, arch="sd1", allow_unmatched=True)
    with pytest.raises(LoraToolError, match="input"):
        merge_checkpoint(src, [MixInput(lora, 1.0)], src, arch="sd1", allow_unmatched=True, force=True)


def test_refuses_other_base_and_wrong_shapes(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    _checkpoint(src, torch.float16)
    xl = _adapter(_lora(UNET_Q, SHAPES[UNET_Q], 4, 2.0, 1), base="sdxl")
    with pytest.raises(LoraToolError, match="for sdxl"):
        merge_checkpoint(src, [MixInput(xl, 1.0)], tmp_path / "o.safetensors", arch="sd1")
    bad = _adapter(_lora(UNET_Q, (320, 640), 4, 2.0, 1), base="unknown")
    with pytest.raises(LoraToolError, match="not for this model"):
        merge_checkpoint(src, [MixInput(bad, 1.0)], tmp_path / "o.safetensors", arch="sd1")
    assert not (tmp_path / "o.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary left behind


def test_fused_rows_of_openclip_in_proj(tmp_path: Path) -> None:
    """SDXL text_encoder_2 q/k/v live in one in_proj_weight; only their rows change."""
    src = tmp_path / "xl.safetensors"
    ckey = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    base = torch.randn(3840, 1280, generator=_g(1))
    write_safetensors(src, {ckey: base, "conditioner.embedders.1.model.ln_final.weight": torch.ones(1280)})
    k = _lora("text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj", (1280, 1280), 4, 4.0, 2)
    merge_checkpoint(src, [MixInput(_adapter(k, base="sdxl"), 0.5)], tmp_path / "o.safetensors", arch="sdxl")
    after = _read(tmp_path / "o.safetensors")[ckey]
    assert torch.equal(after[:1280], base[:1280]) and torch.equal(after[2560:], base[2560:])
    want = base[1280:2560].double() + 0.5 * k.delta(torch.float64)
    assert float((after[1280:2560].double() - want).abs().max()) < 1e-5


def test_placements_transpose_permutation_and_split() -> None:
    g = _g(4)
    m = LoraModule(component="model", path="x", alpha=None, down=torch.randn(2, 4, generator=g),
                   up=torch.randn(6, 2, generator=g))
    delta = m.delta(torch.float64)
    w = torch.randn(6, 4, generator=g)
    t = apply_to_tensor(w.t().contiguous(), [Application(m, 2.0, Placement(op="T"))])
    assert torch.allclose(t.t().double(), w.double() + 2 * delta, atol=1e-6)
    perm = apply_to_tensor(w, [Application(m, 1.0, Placement(rows=((3, 6), (0, 3))))])
    want = w.double().clone()
    want[3:6] += delta[:3]
    want[0:3] += delta[3:]
    assert torch.allclose(perm.double(), want, atol=1e-6)
    part = apply_to_tensor(w[:2], [Application(m, 1.0, Placement(delta_rows=(2, 4)))])
    assert torch.allclose(part.double(), w[:2].double() + delta[2:4], atol=1e-6)
    conv = apply_to_tensor(w.reshape(6, 4, 1, 1), [Application(m, 1.0, Placement(op="conv1x1"))])
    assert torch.allclose(conv.reshape(6, 4).double(), w.double() + delta, atol=1e-6)


@pytest.mark.parametrize(("axis", "weight"), [("out", 1.0), ("in", 1.0), ("out", 0.5)])
def test_dora_merge(axis: str, weight: float) -> None:
    g = _g(5)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mag = torch.rand(6, 1, generator=g, dtype=torch.float64) + 0.5 if axis == "out" else \
        torch.rand(1, 5, generator=g, dtype=torch.float64) + 0.5
    m = LoraModule(component="model", path="x", alpha=2.0, down=torch.randn(2, 5, generator=g),
                   up=torch.randn(6, 2, generator=g), dora=Dora(mag.float(), axis))
    merged = w + m.delta(torch.float64)
    norm = merged.norm(dim=1, keepdim=True) if axis == "out" else merged.norm(dim=0, keepdim=True)
    full = mag * merged / norm
    want = w + weight * (full - w)
    got = apply_to_tensor(w.float(), [Application(m, weight, Placement())])
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_bare_component_file_without_prefix(tmp_path: Path) -> None:
    """A UNet-only single file (no model.diffusion_model. prefix) still matches."""
    src = tmp_path / "unet.safetensors"
    bare = SD1_KEYS[UNET_Q].removeprefix("model.diffusion_model.")
    base = torch.randn(320, 320, generator=_g(2))
    write_safetensors(src, {bare: base})
    m = _lora(UNET_Q, SHAPES[UNET_Q], 4, 2.0, 1)
    merge_checkpoint(src, [MixInput(_adapter(m), 1.0)], tmp_path / "o.safetensors", arch="sd1")
    got = _read(tmp_path / "o.safetensors")[bare]
    assert float((got.double() - base.double() - m.delta(torch.float64)).abs().max()) < 1e-5


def test_overflow_is_an_error_and_leaves_no_output(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    _checkpoint(src, torch.float16)
    m = _lora(UNET_Q, SHAPES[UNET_Q], 4, 2.0, 1)
    out = tmp_path / "o.safetensors"
    with pytest.raises(LoraToolError, match="range"):
        merge_checkpoint(src, [MixInput(_adapter(m), 1e9)], out, arch="sd1", allow_unmatched=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_general_path_for_tucker_and_loha() -> None:
    from loratool.core.modules import LohaModule

    g = _g(6)
    tucker = LoraModule(component="model", path="c", alpha=2.0, down=torch.randn(2, 3, 1, 1, generator=g),
                        mid=torch.randn(2, 2, 3, 3, generator=g), up=torch.randn(4, 2, 1, 1, generator=g))
    loha = LohaModule(component="model", path="l", alpha=1.0, w1a=torch.randn(4, 2, generator=g),
                      w1b=torch.randn(2, 27, generator=g), w2a=torch.randn(4, 2, generator=g),
                      w2b=torch.randn(2, 27, generator=g), shape=(4, 3, 3, 3))
    w = torch.randn(4, 3, 3, 3, generator=g)
    got = apply_to_tensor(w, [Application(tucker, 0.5, Placement()), Application(loha, -2.0, Placement())])
    want = w.double() + 0.5 * tucker.delta(torch.float64) - 2.0 * loha.delta(torch.float64)
    assert torch.allclose(got.double(), want, atol=1e-5)


def test_flux_fused_qkv_parts_and_whole_bare_bfl(tmp_path: Path) -> None:
    """Flux: a diffusers-granularity to_k LoRA lands on rows 3072:6144 of the BFL qkv, a kohya fused
    qkv LoRA on the whole tensor; the file is a bare transformer (no model.diffusion_model.)."""
    src = tmp_path / "flux.safetensors"
    ckey = "double_blocks.0.img_attn.qkv.weight"
    base = torch.full((9216, 3072), 0.25, dtype=torch.bfloat16)  # constant: cheap, and exact in bf16
    write_safetensors(src, {ckey: base})
    k = _lora("transformer.transformer_blocks.0.attn.to_k", (3072, 3072), 2, 2.0, 8)
    qkv = _lora("transformer.transformer_blocks.0.attn.to_qkv", (9216, 3072), 2, 1.0, 9)
    merge_checkpoint(src, [MixInput(_adapter(k, base="flux"), 1.0), MixInput(_adapter(qkv, base="flux"), 0.5)],
                     tmp_path / "o.safetensors", arch="flux")
    got = _read(tmp_path / "o.safetensors")[ckey].float()
    want = 0.25 + 0.5 * qkv.delta(torch.float32)
    want[3072:6144] += k.delta(torch.float32)
    assert torch.allclose(got, want, rtol=2**-7, atol=1e-6)
    assert not torch.allclose(got[3072:6144], 0.25 + 0.5 * qkv.delta(torch.float32)[3072:6144], rtol=2**-7)


def test_block_weights_on_merge(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    before = _checkpoint(src, torch.float32)
    lora = _adapter(*(_lora(k, SHAPES[k], 4, 2.0, n) for n, k in enumerate(SHAPES)))
    # 17 values: BASE, IN01, ... — keep the text encoder at 0.5, cut IN01 (both unet modules here)
    lbw = "0.5," + ",".join(["0"] + ["1"] * 15)
    merge_checkpoint(src, [MixInput(lora, 2.0, lbw)], tmp_path / "o.safetensors", arch="sd1")
    after = _read(tmp_path / "o.safetensors")
    assert torch.equal(after[SD1_KEYS[UNET_Q]], before[SD1_KEYS[UNET_Q]])
    assert torch.equal(after[SD1_KEYS[UNET_CONV]], before[SD1_KEYS[UNET_CONV]])
    want = before[SD1_KEYS[TE_Q]].double() + 1.0 * lora.modules[TE_Q].delta(torch.float64)
    assert float((after[SD1_KEYS[TE_Q]].double() - want).abs().max()) < 1e-5


def test_generic_names_and_bias_changes(tmp_path: Path) -> None:
    """--arch generic: the module path is the tensor name; a module's bias change lands on .bias."""
    from loratool.core.modules import FullModule

    g = _g(11)
    src = tmp_path / "llm.safetensors"
    base = {"layers.0.q.weight": torch.randn(6, 4, generator=g), "layers.0.q.bias": torch.randn(6, generator=g),
            "layers.0.norm.weight": torch.ones(4)}
    write_safetensors(src, base)
    full = FullModule(component="model", path="layers.0.q", diff=torch.randn(6, 4, generator=g),
                      bias=torch.randn(6, generator=g))
    report = merge_checkpoint(src, [MixInput(_adapter(full, base="unknown"), -0.5)], tmp_path / "o.safetensors",
                              arch="generic")
    assert report["tensors_written"] == 2
    out = _read(tmp_path / "o.safetensors")
    assert torch.allclose(out["layers.0.q.weight"], base["layers.0.q.weight"] - 0.5 * full.diff, atol=1e-6)
    assert torch.allclose(out["layers.0.q.bias"], base["layers.0.q.bias"] - 0.5 * full.bias, atol=1e-6)
    assert torch.equal(out["layers.0.norm.weight"], base["layers.0.norm.weight"])
