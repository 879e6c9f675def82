"""Every codec: canonical adapter -> encode -> decode gives the same ΔW (bit-identical factors when only
names change), alpha kept exactly, DoRA axes, rsLoRA, dtypes, metadata and files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_codecs_helpers import adapter_of, assert_same_delta, assert_same_factors, lora, rand

from loratool.core.modules import FullModule, LohaModule, LokrModule, NormModule
from loratool.errors import LoraToolError
from loratool.formats import decode, encode, peft_config, read_adapter, write_adapter
from loratool.formats.peftcfg import METADATA_KEY

A = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
TE = "text_encoder.text_model.encoder.layers.0"


def sd1_adapter(seed: int = 0, rslora_all: bool = False):
    g = torch.Generator().manual_seed(seed)
    mods = [  # SD1 names; small shapes except the cross-attention width that marks SD1 (768)
        lora(g, f"{A}.attn1.to_q", (32, 40), 4, alpha=2.0, rslora=rslora_all),
        lora(g, f"{A}.attn2.to_k", (32, 768), 2, alpha=8.0, dtype=torch.float16, rslora=rslora_all),
        lora(g, f"{A}.attn1.to_v", (32, 40), 4, alpha=1.0, dora="out", rslora=rslora_all),
        lora(g, "unet.down_blocks.0.attentions.0.proj_in", (32, 32, 1, 1), 3, alpha=3.0, dtype=torch.bfloat16,
             rslora=rslora_all),
        lora(g, "unet.down_blocks.0.resnets.0.conv1", (16, 8, 3, 3), 2, alpha=1.5, dora="out", rslora=rslora_all),
        lora(g, "unet.down_blocks.0.resnets.0.time_emb_proj", (16, 64), 2, alpha=None if not rslora_all else 1.0,
             rslora=rslora_all),
        lora(g, f"{TE}.self_attn.q_proj", (48, 48), 4, alpha=4.0, rslora=True),
        lora(g, f"{TE}.mlp.fc1", (96, 48), 2, alpha=0.5, rslora=rslora_all),
    ]
    return adapter_of(mods, "sd1", {"ss_output_name": "demo", "ss_num_train_images": "12"})


def _roundtrip(adapter, fmt):
    if fmt == "peft":
        (comp, (tensors, config)), = ((c, v) for c, v in _peft_parts(adapter).items())
        return decode(tensors, None, config, component=comp), tensors
    tensors, meta = encode(adapter, fmt)
    return decode(tensors, meta), tensors


def _peft_parts(adapter):
    from loratool.formats.diffusers import encode_peft

    return encode_peft(adapter)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sd1_roundtrip_keeps_factors_and_delta(fmt):
    a = sd1_adapter()
    b, tensors = _roundtrip(a, fmt)
    assert_same_delta(a, b, exact=False)
    for key, m in a.modules.items():  # factors are bit-identical: only names changed
        n = b.modules[key]
        assert torch.equal(m.down, n.down) and m.down.dtype == n.down.dtype
        assert torch.equal(m.up, n.up) and m.up.dtype == n.up.dtype
    assert b.base_model == "sd1"


def test_peft_roundtrip_per_component():
    a = sd1_adapter(rslora_all=True)
    a.modules = {k: m for k, m in a.modules.items() if m.component == "unet"}
    b, tensors = _roundtrip(a, "peft")
    assert all(k.startswith("base_model.model.down_blocks.") for k in tensors)
    assert_same_factors(a, b)
    assert all(m.rslora for m in b.modules.values())


def test_names_only_means_the_same_tensor_objects():
    a = sd1_adapter()
    for fmt in ("kohya", "diffusers"):
        tensors, _ = encode(a, fmt)
        ptrs = {t.data_ptr() for t in tensors.values()}
        for m in a.modules.values():
            assert m.down.data_ptr() in ptrs and m.up.data_ptr() in ptrs


def test_kohya_alpha_exact_and_in_the_weights_dtype():
    g = torch.Generator().manual_seed(1)
    half = lora(g, f"{A}.attn1.to_q", (320, 320), 4, alpha=2.0, dtype=torch.float16)
    odd = lora(g, f"{A}.attn1.to_k", (320, 320), 4, alpha=0.1, dtype=torch.bfloat16)  # bf16 cannot hold 0.1
    rs = lora(g, f"{A}.attn1.to_v", (320, 320), 9, alpha=3.0, rslora=True)
    none = lora(g, f"{A}.attn1.to_out.0", (320, 320), 4, alpha=None)
    a = adapter_of([half, odd, rs, none], "sd1")
    tensors, meta = encode(a, "kohya")
    alpha = {k.rsplit(".", 1)[0].split("transformer_blocks_0_")[1]: t for k, t in tensors.items() if k.endswith("alpha")}
    assert alpha["attn1_to_q"].dtype == torch.float16 and alpha["attn1_to_q"].dim() == 0
    assert alpha["attn1_to_k"].dtype == torch.float64 and float(alpha["attn1_to_k"]) == 0.1  # exact, not rounded
    assert float(alpha["attn1_to_v"]) == 3.0 * math.sqrt(9)  # rsLoRA: alpha·√r so that alpha/r is the scale
    assert "attn1_to_out_0" not in alpha  # no alpha stays no alpha (scale 1)
    b = decode(tensors, meta)
    assert b.modules[half.key].alpha == 2.0 and b.modules[odd.key].alpha == 0.1
    assert b.modules[rs.key].scale == pytest.approx(rs.scale, rel=1e-15)
    assert b.modules[none.key].alpha is None
    assert meta["ss_network_dim"] == "4" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_args"] == "{}"
    conv = adapter_of([half, lora(g, "unet.down_blocks.0.resnets.0.conv1", (8, 4, 3, 3), 2, alpha=1.0)], "sd1")
    args = json.loads(encode(conv, "kohya")[1]["ss_network_args"])
    assert args == {"conv_dim": "2", "conv_alpha": "1.0"}


def test_dora_axes():
    g = torch.Generator().manual_seed(2)
    out_lin = lora(g, f"{A}.attn1.to_q", (320, 640), 2, alpha=1.0, dora="out")
    in_lin = lora(g, f"{A}.attn1.to_k", (320, 640), 2, alpha=1.0, dora="in")
    out_conv = lora(g, "unet.down_blocks.0.resnets.0.conv1", (320, 64, 3, 3), 2, alpha=1.0, dora="out")
    a = adapter_of([out_lin, in_lin, out_conv], "sd1")
    kt, km = encode(a, "kohya")
    shapes = {k: tuple(t.shape) for k, t in kt.items() if k.endswith("dora_scale")}
    assert sorted(shapes.values()) == sorted([(320, 1), (1, 640), (320, 1, 1, 1)])
    assert_same_delta(a, decode(kt, km), exact=True)
    with pytest.raises(LoraToolError, match="input axis"):
        encode(a, "diffusers")
    a.modules.pop(in_lin.key)
    dt, dm = encode(a, "diffusers")
    mags = {k: tuple(t.shape) for k, t in dt.items() if k.endswith("lora_magnitude_vector")}
    assert sorted(mags.values()) == sorted([(320,), (1, 320, 1, 1)])
    assert_same_delta(a, decode(dt, dm), exact=True)


def test_lycoris_kinds_go_to_kohya_as_they_are():
    """The kohya layout holds every LyCORIS kind (as LyCORIS saves it with kohya ids): read back as kohya."""
    g = torch.Generator().manual_seed(3)
    loha = LohaModule("unet", "down_blocks.0.resnets.0.conv2", alpha=2.0, w1a=rand(g, 320, 4), w1b=rand(g, 4, 2880),
                      w2a=rand(g, 320, 4), w2b=rand(g, 4, 2880), shape=(320, 320, 3, 3))
    loha_t = LohaModule("unet", "down_blocks.0.resnets.1.conv1", alpha=4.0, w1a=rand(g, 4, 32), w1b=rand(g, 4, 32),
                        w2a=rand(g, 4, 32), w2b=rand(g, 4, 32), t1=rand(g, 4, 4, 3, 3), t2=rand(g, 4, 4, 3, 3))
    lokr = LokrModule("text_encoder", "text_model.encoder.layers.0.mlp.fc1", alpha=4.0, w1=rand(g, 8, 4),
                      w2a=rand(g, 24, 4), w2b=rand(g, 4, 12))
    full = FullModule("unet", "down_blocks.0.resnets.0.conv_shortcut", diff=rand(g, 8, 4, 1, 1), bias=rand(g, 8))
    norm = NormModule("unet", "down_blocks.0.resnets.0.norm1", w_norm=rand(g, 32), bias=rand(g, 32))
    tucker = lora(g, "unet.down_blocks.1.resnets.0.conv1", (16, 8, 3, 3), 3, alpha=1.0, tucker=True)
    a = adapter_of([loha, loha_t, lokr, full, norm, tucker], "sd1")
    tensors, meta = encode(a, "kohya")
    b = decode(tensors, meta)
    assert b.source_format == "kohya"
    assert_same_delta(a, b, exact=True)
    assert_same_factors(a, b)
    assert meta["ss_network_module"] == "lycoris.kohya"
    for fmt in ("diffusers", "peft"):
        with pytest.raises(LoraToolError, match="cannot be written"):
            encode(adapter_of([tucker], "sd1"), fmt)


@pytest.mark.slow  # importing peft takes ~15 s on a small box; the check itself is instant
def test_diffusers_metadata_is_a_valid_peft_config_with_patterns():
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    a = sd1_adapter()
    tensors, meta = encode(a, "diffusers")
    data = json.loads(meta[METADATA_KEY])
    for comp in ("unet", "text_encoder"):
        cfg = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(comp + ".")}
        LoraConfig(**cfg)  # diffusers builds its config from exactly these keys
        for m in (m for m in a.modules.values() if m.component == comp):
            r = cfg["rank_pattern"].get(get_pattern_key(cfg["rank_pattern"].keys(), m.path), cfg["r"])
            alpha = cfg["alpha_pattern"].get(get_pattern_key(cfg["alpha_pattern"].keys(), m.path), cfg["lora_alpha"])
            assert r == m.rank
            peft_scale = alpha / (math.sqrt(r) if cfg["use_rslora"] else r)
            assert peft_scale == pytest.approx(m.scale, rel=1e-12), m.key


def test_peft_folder_files(tmp_path):
    a = sd1_adapter()
    out = write_adapter(a, tmp_path / "peft_out", "peft")
    assert sorted(p.name for p in out.iterdir()) == ["text_encoder", "unet"]
    cfg = json.loads((out / "unet" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    b = read_adapter(out)
    assert_same_delta(a, b, exact=False)
    assert b.modules[f"{TE}.self_attn.q_proj"].scale == pytest.approx(a.modules[f"{TE}.self_attn.q_proj"].scale)
    with pytest.raises(LoraToolError, match="exists"):
        write_adapter(a, out, "peft")
    single = adapter_of([m for m in a.modules.values() if m.component == "unet"], "sd1")
    one = write_adapter(single, tmp_path / "one", "peft")
    assert (one / "adapter_model.safetensors").is_file() and (one / "adapter_config.json").is_file()
    assert set(read_adapter(one).modules) == set(single.modules)
    assert set(peft_config(single)) == {"unet"}


def test_write_file_metadata_and_hash(tmp_path):
    from loratool.io.hashes import check_hash
    from loratool.io.safetensors import read_metadata

    a = sd1_adapter()
    path = write_adapter(a, tmp_path / "k.safetensors", "webui", metadata={"loratool.command": "convert"})
    meta = read_metadata(path)
    assert check_hash(path) is True
    assert meta["ss_output_name"] == "demo" and meta["ss_num_train_images"] == "12"  # training keys kept
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["loratool.command"] == "convert"
    with pytest.raises(LoraToolError, match="exists"):
        write_adapter(a, path, "kohya")
    again = write_adapter(read_adapter(path), tmp_path / "k2.safetensors", "kohya", inputs=[path])
    assert again.read_bytes() == path.read_bytes()  # read -> write of the same layout: same bytes
    with pytest.raises(LoraToolError, match="input"):
        write_adapter(read_adapter(path), path, "kohya", force=True, inputs=[path])


def test_sdxl_kohya_uses_sai_names_and_te1_te2():
    g = torch.Generator().manual_seed(4)
    a = adapter_of([
        lora(g, "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k", (640, 2048), 2, alpha=1.0),
        lora(g, "unet.up_blocks.0.upsamplers.0.conv", (1280, 1280, 3, 3), 2, alpha=1.0),
        lora(g, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", (768, 768), 2, alpha=1.0),
        lora(g, "text_encoder_2.text_model.encoder.layers.31.mlp.fc2", (1280, 5120), 2, alpha=1.0),
    ], "sdxl")
    tensors, meta = encode(a, "kohya")
    ids = sorted({k.split(".")[0] for k in tensors})
    assert ids == ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_31_mlp_fc2",
                   "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "lora_unet_output_blocks_2_2_conv"]
    b = decode(tensors, meta)
    assert b.base_model == "sdxl"
    assert_same_factors(a, b)


def test_text_encoder_written_with_text_model_and_read_without():
    g = torch.Generator().manual_seed(5)
    m = lora(g, f"{TE}.self_attn.k_proj", (768, 768), 2, alpha=1.0)
    tensors = {"text_encoder.encoder.layers.0.self_attn.k_proj.lora_A.weight": m.down,
               "text_encoder.encoder.layers.0.self_attn.k_proj.lora_B.weight": m.up}
    b = decode(tensors)
    assert list(b.modules) == [m.key]
    out, _ = encode(b, "diffusers")
    assert all(".text_model.encoder." in k for k in out)
    kout, _ = encode(b, "kohya")
    assert all(k.startswith("lora_te_text_model_") for k in kout)


def test_empty_adapter_is_refused():
    with pytest.raises(LoraToolError, match="no modules"):
        encode(adapter_of([]), "kohya")
    with pytest.raises(LoraToolError, match="unknown output format"):
        encode(sd1_adapter(), "safetensors2")


def test_lora_bias_between_peft_and_kohya():
    """peft's lora_B.bias is scaled like ΔW; kohya/LyCORIS diff_b is not: written as bias·scale, read back."""
    g = torch.Generator().manual_seed(6)
    unit = lora(g, f"{A}.attn1.to_q", (8, 6), 2, alpha=2.0, bias=True)  # scale 1: bit-identical
    half = lora(g, f"{A}.attn1.to_k", (8, 6), 2, alpha=1.0, bias=True)  # scale 0.5
    a = adapter_of([unit, half], "sd1")
    kt, km = encode(a, "kohya")
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_"
    assert kt[prefix + "q.diff_b"] is unit.bias
    assert torch.equal(kt[prefix + "k.diff_b"], half.bias * 0.5)
    b = decode(kt, km)
    assert torch.equal(b.modules[unit.key].bias, unit.bias)
    assert torch.allclose(b.modules[half.key].bias, half.bias, rtol=1e-7, atol=0)
    dt, dm = encode(b, "diffusers")
    assert dt[f"{half.key}.lora_B.bias"] is b.modules[half.key].bias


def test_peft_config_without_lora_alpha_takes_peft_default():
    g = torch.Generator().manual_seed(7)
    m = lora(g, "unet.down_blocks.0.resnets.0.conv1", (8, 4, 3, 3), 4)
    tensors = {"base_model.model.down_blocks.0.resnets.0.conv1.lora_A.weight": m.down,
               "base_model.model.down_blocks.0.resnets.0.conv1.lora_B.weight": m.up}
    a = decode(tensors, config={"peft_type": "LORA", "r": 4})
    assert a.modules[m.key].alpha == 8.0 and a.modules[m.key].scale == 2.0  # LoraConfig's lora_alpha=8


def test_flat_lora_on_a_1x1_conv_is_read_conv_shaped():
    g = torch.Generator().manual_seed(8)
    down, up = rand(g, 4, 320), rand(g, 320, 4)  # SD1 proj_in is a 1x1 conv; some trainers store matrices
    key = "lora_unet_down_blocks_0_attentions_0_proj_in"
    k2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # pins SD1 (context 768)
    a = decode({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(4.0),
                f"{k2}.lora_down.weight": rand(g, 4, 768), f"{k2}.lora_up.weight": rand(g, 320, 4)})
    assert a.base_model == "sd1"
    m = a.modules["unet.down_blocks.0.attentions.0.proj_in"]
    assert m.weight_shape == (320, 320, 1, 1) and m.down.data_ptr() == down.data_ptr()
    assert torch.equal(m.delta(torch.float64).reshape(320, 320), up.double() @ down.double())


def test_sd3_modulation_rows_follow_the_table():
    """SAI MMDiT stores the last context block's and the final modulation as [shift, scale]."""
    g = torch.Generator().manual_seed(9)
    kid = "lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"
    up, down = rand(g, 3072, 2), rand(g, 2, 1536)
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    t = {f"{kid}.lora_down.weight": down, f"{kid}.lora_up.weight": up,
         f"{qkv}.lora_down.weight": rand(g, 2, 1536), f"{qkv}.lora_up.weight": rand(g, 4608, 2)}
    a = decode(t)
    m = a.modules["transformer.transformer_blocks.23.norm1_context.linear"]
    assert a.base_model == "sd3" and torch.equal(m.up, torch.cat([up[1536:], up[:1536]]))
    assert torch.equal(encode(a, "kohya")[0][f"{kid}.lora_up.weight"], up)
    del a.modules["transformer.transformer_blocks.0.attn.to_qkv"]  # fused: diffusers has no such name
    assert torch.equal(encode(a, "diffusers")[0][f"{m.key}.lora_B.weight"], m.up)


def test_network_args_kept_only_for_the_same_network_module():
    g = torch.Generator().manual_seed(10)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": '{"algo": "lokr"}'}
    a = adapter_of([lora(g, f"{A}.attn1.to_q", (8, 6), 2, alpha=1.0)], "sd1", meta)
    out = encode(a, "kohya")[1]
    assert out["ss_network_module"] == "networks.lora" and out["ss_network_args"] == "{}"
    meta["ss_network_module"] = "networks.lora"
    assert encode(adapter_of(list(a.modules.values()), "sd1", meta), "kohya")[1]["ss_network_args"] == '{"algo": "lokr"}'
