"""`loratool mix` end to end: files in, the exact weighted sum out; specs, LBW, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli
from loratool.core.modules import Adapter, LoraModule
from loratool.formats import read_adapter, write_adapter

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
MID = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "unet.down_blocks.0.resnets.0.conv1"
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
SHAPES = {Q: (320, 320), MID: (1280, 768), CONV: (320, 320, 3, 3), TE: (768, 768)}


def make_lora(path: Path, rank: int, alpha: float, seed: int, keys=tuple(SHAPES)) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    a = Adapter(base_model="sd1")
    for key in keys:
        shape = SHAPES[key]
        comp, p = key.split(".", 1)
        down = torch.randn(rank, *shape[1:], generator=g) * 0.1
        up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=g) * 0.1
        a.add(LoraModule(component=comp, path=p, alpha=alpha, down=down, up=up))
    write_adapter(a, path, "kohya")
    return read_adapter(path)


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path, Adapter, Adapter]:
    a = make_lora(tmp_path / "a.safetensors", 4, 2.0, 1)
    b = make_lora(tmp_path / "b.safetensors", 8, 8.0, 2, keys=(Q, CONV, TE))
    return tmp_path / "a.safetensors", tmp_path / "b.safetensors", a, b


def test_concat_file_roundtrip(two, tmp_path: Path) -> None:
    pa, pb, a, b = two
    out = tmp_path / "m.safetensors"
    res = run("mix", f"{pa}:0.7", f"{pb}:-0.4", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["modules"] == 4 and report["max_rel_error"] == 0.0
    m = read_adapter(out)
    for key in SHAPES:
        want = 0.7 * a.modules[key].delta(torch.float64)
        if key in b.modules:
            want = want - 0.4 * b.modules[key].delta(torch.float64)
        assert _rel(m.modules[key].delta(torch.float64), want) < 1e-6, key


def test_svd_and_block_weights(two, tmp_path: Path) -> None:
    pa, pb, a, b = two
    out = tmp_path / "m.safetensors"
    # sd1 17-value vector: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID, OUT03..OUT11
    lbw = "0.5,0,1,1,1,1,1,2,1,1,1,1,1,1,1,1,1"
    res = run("mix", f"{pa}:1:lbw={lbw}", f"{pb}:0.5", "-o", out, "--mode", "svd", "-r", "6", "--json")
    assert res.exit_code == 0, res.output
    m = read_adapter(out)
    assert {k: mod.rank for k, mod in m.modules.items()} == {Q: 6, CONV: 6, TE: 6, MID: 4}  # MID: rank 4 only
    # the dense float64 reference on the two small layers (the unit tests cover every kind)
    block = {TE: 0.5, Q: 0.0, CONV: 0.0, MID: 2.0}
    for key in (Q, TE):
        want = block[key] * a.modules[key].delta(torch.float64) + 0.5 * b.modules[key].delta(torch.float64)
        u, s, vh = torch.linalg.svd(want, full_matrices=False)
        best = (u[:, :6] * s[:6]) @ vh[:6]
        assert _rel(m.modules[key].delta(torch.float64), best) < 1e-5, key
    per = {r["key"]: r for r in json.loads(res.output)["per_module"]}
    assert per[MID]["inputs"] == 1 and per[MID]["rel_error"] < 1e-6  # rank 4 (x2 block weight) fits in 6


def test_preset_and_output_format(two, tmp_path: Path) -> None:
    pa, pb, a, _ = two
    out = tmp_path / "m.safetensors"
    res = run("mix", f"{pa}:1:lbw=MIDD", "-o", out, "--to", "diffusers", "-q")
    assert res.exit_code == 0 and res.output == ""
    m = read_adapter(out)
    assert m.source_format != "kohya"
    from loratool.arch import lbw_weights, load_arch

    table, arch = lbw_weights("sd1", "MIDD"), load_arch("sd1")
    assert {table[arch.modules[k].block] for k in SHAPES} == {0.0, 1.0}  # the preset really cuts some
    for key in SHAPES:
        want = table[arch.modules[key].block] * a.modules[key].delta(torch.float64)
        assert torch.allclose(m.modules[key].delta(torch.float64), want, atol=1e-7), key


def test_errors_are_one_line(two, tmp_path: Path) -> None:
    pa, _, _, _ = two
    out = tmp_path / "m.safetensors"
    res = CliRunner().invoke(cli, ["mix", f"{pa}:abc:def", "-o", str(out)])
    assert res.exit_code == 1 and "contains ':'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["mix", f"{pa}:1:lbw=1,2,3", "-o", str(out)])
    assert res.exit_code == 1 and "values" in res.output
    xl = tmp_path / "xl.safetensors"
    g = torch.Generator().manual_seed(0)
    ad = Adapter(base_model="sdxl")
    ad.add(LoraModule(component="unet", path="down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
                      alpha=1.0, down=torch.randn(2, 2048, generator=g), up=torch.randn(640, 2, generator=g)))
    write_adapter(ad, xl, "kohya")
    res = CliRunner().invoke(cli, ["mix", str(pa), str(xl), "-o", str(out)])
    assert res.exit_code == 1 and "different base models" in res.output
    assert not out.exists()
    run("mix", str(pa), "-o", out)
    res = CliRunner().invoke(cli, ["mix", str(pa), "-o", str(out)])
    assert res.exit_code == 1 and "exists" in res.output


def test_path_with_colon(tmp_path: Path) -> None:
    odd = tmp_path / "my:lora.safetensors"
    make_lora(odd, 2, 2.0, 5, keys=(Q,))
    out = tmp_path / "m.safetensors"
    assert run("mix", odd, "-o", out, "-q").exit_code == 0
    assert run("mix", f"{odd}:0.5", "-o", tmp_path / "n.safetensors", "-q").exit_code == 0


def test_real_sd15_loras_mix_exactly_and_refuse_sd2(real_dir: Path, tmp_path: Path) -> None:
    """Two real SD1.5 diffusers-made LoRAs (different layouts) and three modules of a real LyCORIS LoKr."""
    from loratool.ops.mix import MixInput, mix

    ads = real_dir / "adapters"
    a = read_adapter(ads / "sd15_diffusers_attnprocs.safetensors")
    c = read_adapter(ads / "sd15_diffusers_lora_down_up.safetensors")
    lokr = read_adapter(ads / "sd15_kohya_lycoris_lokr_r4.safetensors")
    small = sorted((k for k, m in lokr.modules.items() if len(m.weight_shape) == 2 and k in a.modules),
                   key=lambda k: lokr.modules[k].weight_shape)[:3]
    assert small, "the LoKr file shares no linear module with the attnprocs LoRA"
    lokr.modules = {k: lokr.modules[k] for k in small}
    inputs = [MixInput(a, 0.6), MixInput(c, -0.3), MixInput(lokr, 0.8)]
    res = mix(inputs)
    checked = set(small) | set(sorted(res.adapter.modules)[::8])  # a float64 reference on a sample
    for key in sorted(checked):
        m = res.adapter.modules[key]
        want = sum(i.weight * i.adapter.modules[key].delta(torch.float64) for i in inputs if key in i.adapter.modules)
        assert _rel(m.delta(torch.float64).reshape(want.shape), want) < 1e-5, key
    assert {r.key for r in res.modules if r.method == "concat+factored"} == set(small)  # the LoKr's factors
    out = tmp_path / "x.safetensors"
    res = CliRunner().invoke(cli, ["mix", str(ads / "sd15_diffusers_lora_down_up.safetensors"),
                                   str(ads / "sd2_diffusers_lora_down_up.safetensors"), "-o", str(out)])
    assert res.exit_code == 1 and "different base models" in res.output and not out.exists()
