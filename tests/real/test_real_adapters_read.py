"""Real files made by other tools: each is read with the right format, base model, module count and ranks.

The expected values were found by looking at the files (keys, shapes, metadata) and checked against what
the producers are known to write: diffusers' SD1.x attention-only LoRA is 16 transformer blocks x 8
projections = 128 modules; sd-scripts/LyCORIS with conv layers is 72 text-encoder + 278 UNet modules;
cloneofsimo injects 9 Linear layers per SD1.x transformer block (q,k,v,out of attn1 and attn2 + the GEGLU
projection) = 144, and 4 per CLIP layer = 48.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from loratool.arch import load_arch
from loratool.formats import read_adapter
from loratool.io.writer import write_safetensors

pytestmark = pytest.mark.real

ADAPTERS = {
    # file: (format, base, modules, {component: count}, ranks, kinds, dtype)
    "flux_aitoolkit_peft_r16.safetensors": ("aitoolkit", "flux", 4, {"transformer": 4}, {16}, ["lora"],
                                            torch.float16),
    "sd15_cloneofsimo_safeloras.safetensors": ("cloneofsimo", "sd1", 192, {"unet": 144, "text_encoder": 48}, {1},
                                               ["lora"], torch.float32),
    "sd15_diffusers_attnprocs.safetensors": ("diffusers-attnproc", "sd1", 128, {"unet": 128}, {4}, ["lora"],
                                             torch.float32),
    "sd15_diffusers_attnprocs_unet_prefix.safetensors": ("diffusers-attnproc", "sd1", 128, {"unet": 128}, {4},
                                                         ["lora"], torch.float32),
    "sd15_diffusers_lora_down_up.safetensors": ("diffusers-old", "sd1", 128, {"unet": 128}, {4}, ["lora"],
                                                torch.float32),
    "sd15_kohya_lycoris_lokr_r4.safetensors": ("kohya", "sd1", 350, {"unet": 278, "text_encoder": 72}, {4},
                                               ["lokr"], torch.float16),
    "sd2_diffusers_attnprocs_unet_prefix.safetensors": ("diffusers-attnproc", "sd2", 128, {"unet": 128}, {4},
                                                        ["lora"], torch.float32),
    "sd2_diffusers_bf16.safetensors": ("diffusers-old", "sd2", 128, {"unet": 128}, {4}, ["lora"], torch.bfloat16),
    "sd2_diffusers_lora_down_up.safetensors": ("diffusers-old", "sd2", 128, {"unet": 128}, {4}, ["lora"],
                                               torch.float32),
}


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_real_adapter(real_dir, name):
    fmt, base, count, comps, ranks, kinds, dtype = ADAPTERS[name]
    a = read_adapter(real_dir / "adapters" / name)
    assert (a.source_format, a.base_model, len(a.modules)) == (fmt, base, count)
    assert a.components() == comps
    assert {m.rank for m in a.modules.values()} == ranks
    assert a.kinds == kinds
    assert a.unknown == []
    assert {t.dtype for m in a.modules.values() for t in m.tensors()} == {dtype}
    table = load_arch(base)
    for key, m in a.modules.items():  # every module is a layer of that model, with its shape
        assert key in table.modules, key
        assert m.weight_shape == tuple(table.modules[key].shape), key


def test_lokr_alpha_and_conv_shapes(real_dir):
    a = read_adapter(real_dir / "adapters" / "sd15_kohya_lycoris_lokr_r4.safetensors")
    assert {m.alpha for m in a.modules.values()} == {4.0}
    conv = a.modules["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.weight_shape == (320, 320, 3, 3)  # LyCORIS stored it flat: the table gives the kernel
    assert conv.delta(torch.float32).shape == (320, 320, 3, 3)
    assert a.metadata["ss_network_module"] == "lycoris.kohya" and len(a.metadata) == 61


def test_cloneofsimo_embeddings_and_order(real_dir):
    a = read_adapter(real_dir / "adapters" / "sd15_cloneofsimo_safeloras.safetensors")
    assert sorted(a.embeddings) == ["<s1>", "<s2>"]
    assert all(t.shape == (1, 768) for t in a.embeddings.values())
    ff = a.modules["unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"]
    assert ff.weight_shape == (10240, 1280)  # index 139: the GEGLU between attn1 and attn2
    assert all(m.alpha is None for m in a.modules.values())  # lora_diffusion applies up·down at scale 1


def test_aitoolkit_metadata_kept(real_dir):
    a = read_adapter(real_dir / "adapters" / "flux_aitoolkit_peft_r16.safetensors")
    assert "ai-toolkit" in a.metadata["software"]
    assert sorted(a.modules) == [f"transformer.single_transformer_blocks.{i}.proj_out" for i in (12, 16, 20, 7)]


def test_malformed_file_reports_every_key_by_name(real_dir):
    path = real_dir / "bad" / "sd15_malformed_hand_converted.safetensors"
    a = read_adapter(path)
    assert not a.modules
    assert len(a.unknown) == 256
    assert "lora_unet_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k_lora_down.weight" in a.unknown
    assert all("no known adapter key layout" in a.unknown_reasons[k] for k in a.unknown)


def test_pickle_is_read_weights_only(real_dir):
    a = read_adapter(real_dir / "bad" / "sd15_diffusers_pickle.bin")
    assert (a.source_format, a.base_model, len(a.modules)) == ("diffusers-attnproc", "sd1", 128)


KEYSHAPES = {
    # table: (format, base, modules, {component: count})
    "flux_aitoolkit_lora_r16": ("bfl", "flux", 228, {"transformer": 228}),
    "flux_bfl_lokr_excerpt": ("bfl", "flux", 6, {"transformer": 6}),
    "flux_diffusers_lora_r32": ("diffusers", "flux", 494, {"transformer": 494}),
    "flux_kohya_lora_r16": ("kohya", "flux", 304, {"transformer": 304}),
    "flux_kohya_lora_with_te1_r4": ("kohya", "flux", 376, {"transformer": 304, "text_encoder": 72}),
    "flux_kohya_style_dora_r4": ("onetrainer", "flux", 266, {"transformer": 266}),
    "flux_onetrainer_dora_r4": ("onetrainer", "flux", 506, {"transformer": 266, "text_encoder": 72,
                                                            "text_encoder_2": 168}),
    "flux_peft_base_model_r4": ("peft", "flux", 381, {"transformer": 381}),
    "flux_xlabs_lora_excerpt": ("xlabs", "flux", 12, {"transformer": 12}),
    "sd15_kohya_lora_r128": ("kohya", "sd1", 264, {"unet": 192, "text_encoder": 72}),
    "sdxl_kohya_lora_r32": ("kohya", "sdxl", 986, {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}),
}
_DOWN = ("lora_down.weight", "lora_A.weight", ".down.weight")
_UP = ("lora_up.weight", "lora_B.weight", ".up.weight")


def _rank_one(key: str, shape: list[int]) -> list[int]:
    """The table's shape with the LoRA rank cut to 1: every layer shape (what detection reads) is kept,
    the file is 16-128x smaller than the original."""
    if key.endswith(_DOWN):
        return [1, *shape[1:]]
    if key.endswith(_UP):
        return [shape[0], 1, *shape[2:]]
    return shape


@pytest.mark.parametrize("table", sorted(KEYSHAPES))
def test_keyshapes_table_reads_with_no_unknown_keys(real_dir, tmp_path, table):
    fmt, base, count, comps = KEYSHAPES[table]
    spec = json.loads((real_dir / "keyshapes" / f"{table}.json").read_text())
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key, v in spec.items():
        if "shape" not in v:
            continue  # a metadata entry dumped beside the tensors (flux_peft_base_model)
        shape = _rank_one(key, v["shape"]) if not table.endswith("excerpt") else v["shape"]
        tensors[key] = torch.randn(*shape, generator=g).to(torch.float16) if shape else torch.tensor(1.0)
    path = write_safetensors(tmp_path / f"{table}.safetensors", tensors)
    a = read_adapter(path)
    assert a.unknown == []
    assert (a.source_format, a.base_model, len(a.modules)) == (fmt, base, count)
    assert a.components() == comps
    kinds = Counter(m.kind for m in a.modules.values())
    assert set(kinds) == ({"lokr"} if "lokr" in table else {"lora"})
    if "dora" in table:
        assert all(m.dora is not None for m in a.modules.values())


GOLDEN = {  # table: the layouts that must give back exactly the table's keys and shapes
    "sd15_kohya_lora_r128": ("kohya", ["diffusers", "peft"]),
    "sdxl_kohya_lora_r32": ("kohya", ["diffusers"]),
    "flux_kohya_lora_r16": ("kohya", []),
    "flux_kohya_lora_with_te1_r4": ("kohya", []),
    "flux_aitoolkit_lora_r16": ("bfl", []),
    "flux_diffusers_lora_r32": ("aitoolkit", ["diffusers"]),
}


@pytest.mark.parametrize("table", sorted(GOLDEN))
def test_golden_names(real_dir, table):
    """Read a real table, write it in its own layout (directly and through other layouts): same keys, shapes."""
    from loratool.formats import decode, encode
    from loratool.formats.diffusers import encode_peft

    own, via = GOLDEN[table]
    spec = json.loads((real_dir / "keyshapes" / f"{table}.json").read_text())
    tensors = {k: torch.zeros(_rank_one(k, v["shape"]), dtype=torch.float16) if v["shape"] else torch.tensor(1.0)
               for k, v in spec.items() if "shape" in v}
    expected = {k: tuple(t.shape) for k, t in tensors.items() if own != "aitoolkit" or not k.endswith("alpha")}
    a = decode(tensors)
    out, _ = encode(a, own)
    assert {k: tuple(t.shape) for k, t in out.items()} == expected
    for fmt in via:
        if fmt == "peft":
            parts = encode_peft(a)
            b = decode(parts["unet"][0], None, parts["unet"][1], component="unet")
            b.modules.update(decode(parts["text_encoder"][0], None, parts["text_encoder"][1],
                                    component="text_encoder").modules)
            b.base_model = a.base_model
        else:
            b = decode(*encode(a, fmt))
        again, _ = encode(b, own)
        assert {k: tuple(t.shape) for k, t in again.items()} == expected, fmt


def test_bfl_lokr_excerpt_written_back_as_it_was(real_dir):
    from loratool.formats import decode, encode

    spec = json.loads((real_dir / "keyshapes" / "flux_bfl_lokr_excerpt.json").read_text())
    g = torch.Generator().manual_seed(1)
    tensors = {k: torch.randn(*v["shape"], generator=g).to(torch.bfloat16) if v["shape"] else torch.tensor(32.0)
               for k, v in spec.items()}
    out, _ = encode(decode(tensors), "bfl")
    assert set(out) == set(tensors)
    assert all(torch.equal(out[k], t) for k, t in tensors.items())
