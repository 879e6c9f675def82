"""The architecture tables against real key/shape dumps and ai-toolkit's name maps (../shared)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from loratool.arch import detect_arch_from_checkpoint, family, load_arch


@cache
def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def keyshapes(real_dir: Path, name: str) -> dict[str, list[int]]:
    return {k: v["shape"] for k, v in _read(real_dir / "keyshapes" / name).items()}


def _kohya_modules(table: dict[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    mods: dict[str, dict[str, list[int]]] = {}
    for key, shape in table.items():
        module, _, suffix = key.partition(".")
        mods.setdefault(module, {})[suffix] = shape
    return mods


def _check_lora_shape(spec_shape: tuple[int, ...], down: list[int], up: list[int]) -> None:
    rank = down[0]
    assert up[1] == rank
    assert up[0] == spec_shape[0], (spec_shape, up)
    assert down[1] == spec_shape[1], (spec_shape, down)
    if len(spec_shape) == 4:  # kohya conv: down keeps the kernel, up is 1x1
        assert tuple(down[2:]) == spec_shape[2:] and tuple(up[2:]) == (1, 1)
    else:
        assert len(down) == 2 and len(up) == 2


@pytest.mark.parametrize(
    ("arch_name", "fixture", "count"),
    [
        ("sdxl", "sdxl_kohya_lora_r32.json", 264 + 722),
        ("sd1", "sd15_kohya_lora_r128.json", 264),
        ("flux", "flux_kohya_lora_r16.json", 304),
        ("flux", "flux_kohya_lora_with_te1_r4.json", 376),
    ],
)
def test_kohya_lora_keys_map_to_modules_of_matching_shape(real_dir, arch_name, fixture, count):
    arch = load_arch(arch_name)
    mods = _kohya_modules(keyshapes(real_dir, fixture))
    if count is not None:
        assert len(mods) == count
    for module_id, tensors in mods.items():
        key = family(arch.name).from_kohya(module_id)
        assert key is not None, module_id
        spec = arch.modules[key]
        assert arch.to_kohya(key) == module_id
        _check_lora_shape(spec.shape, tensors["lora_down.weight"], tensors["lora_up.weight"])


def test_sdxl_kohya_lora_blocks_and_te(real_dir):
    arch = load_arch("sdxl")
    mods = _kohya_modules(keyshapes(real_dir, "sdxl_kohya_lora_r32.json"))
    specs = [arch.modules[family(arch.name).from_kohya(m)] for m in mods]
    te = [s for s in specs if s.component.startswith("text_encoder")]
    assert len(te) == 264 and {s.block for s in te} == {"BASE"}
    unet = [s for s in specs if s.component == "unet"]
    assert {s.group for s in unet} <= {"attn", "conv"}
    assert all(s.block and s.block[:2] in ("IN", "MI", "OU") for s in unet)


def _shape_of_ckpt_table(real_dir, name):
    return {k: v["shape"] for k, v in _read(real_dir / "keyshapes" / name).items()}


CHECKPOINTS = [
    ("sd1", "sd15_ldm_checkpoint_full.json"),
    ("sdxl", "sdxl_sgm_checkpoint_full.json"),
    ("flux", "flux_bfl_checkpoint_full.json"),
    ("sd3", "sd3_comfyui_checkpoint_full.json"),
]


@pytest.mark.parametrize(("arch_name", "fixture"), CHECKPOINTS)
def test_checkpoint_map_agrees_with_full_checkpoint(real_dir, arch_name, fixture):
    arch = load_arch(arch_name)
    table = _shape_of_ckpt_table(real_dir, fixture)
    for ckey, entries in arch.checkpoint_map.items():
        assert ckey in table, ckey
        shape = table[ckey]
        for key, rows in entries:
            spec = arch.modules[key]
            if rows is None:
                assert tuple(shape) == spec.shape, (ckey, key)
            else:
                assert rows[1] <= shape[0] and rows[1] - rows[0] == spec.shape[0]
                assert tuple(shape[1:]) == spec.shape[1:]
    covered = {arch.checkpoint_map[k][0][0].split(".")[0] for k in arch.checkpoint_map}
    assert covered == set(arch.components)


@pytest.mark.parametrize(("arch_name", "fixture"), CHECKPOINTS)
def test_every_checkpoint_key_is_mapped_or_known_extra(real_dir, arch_name, fixture):
    arch = load_arch(arch_name)
    table = _shape_of_ckpt_table(real_dir, fixture)
    unknown = [k for k in table if arch.checkpoint_shape(k) is None and not arch.is_checkpoint_extra(k)]
    assert unknown == []
    wrong = {k: (s, arch.checkpoint_shape(k)) for k, s in table.items()
             if arch.checkpoint_shape(k) is not None and tuple(s) != arch.checkpoint_shape(k)}
    assert wrong == {}
    missing = [k for k in arch.checkpoint_params if k not in table]
    assert missing == []
    # every 2-D/4-D weight inside the unet/transformer or a TE attention/MLP is targetable
    for key, shape in table.items():
        params = arch.checkpoint_params.get(key, [])
        if key.endswith(".weight") and len(shape) in (2, 4) and params:
            skip = ("embedding", "shared", "relative_attention_bias")
            if params[0].component != "vae" and not any(s in key for s in skip):
                assert key in arch.checkpoint_map, key


@pytest.mark.parametrize(("arch_name", "fixture"), CHECKPOINTS)
def test_detect_arch_from_full_checkpoint(real_dir, arch_name, fixture):
    assert detect_arch_from_checkpoint(_shape_of_ckpt_table(real_dir, fixture)) == arch_name


@pytest.mark.parametrize("arch_name", ["sd1", "sd2", "sdxl"])
def test_diffusers_names_agree_with_aitoolkit_keymap(real_dir, arch_name):
    """ai-toolkit's LDM/SGM -> diffusers key map, a second opinion on every name we share."""
    arch = load_arch(arch_name)
    km = _read(real_dir / "keymaps" / f"stable_diffusion_{arch_name}.json")
    comp_of = {"unet": "unet", "te": "text_encoder", "te0": "text_encoder", "te1": "text_encoder_2",
               "vae": "vae"}
    if arch_name != "sdxl":
        comp_of.pop("te1")
    checked = 0
    for ldm, diff in km["ldm_diffusers_keymap"].items():
        comp_tag, _, name = diff.partition("_")
        params = arch.checkpoint_params.get(ldm)
        if params is None:
            assert arch.is_checkpoint_extra(ldm) or ldm.endswith(".position_ids"), ldm
            continue
        assert len(params) == 1 and params[0].component == comp_of[comp_tag], ldm
        assert params[0].name == name, (ldm, params[0].name, name)
        checked += 1
    for ldm, ops in km["ldm_diffusers_operator_map"].items():
        for op, names in ops if isinstance(ops, list) else []:
            assert op == "cat"
            ours = sorted(arch.checkpoint_params[ldm], key=lambda p: p.rows[0][0])
            assert [f"{p.name}" for p in ours] == [n.partition("_")[2] for n in names], ldm
    assert checked > 1000


def test_sdxl_diffusers_full_tables(real_dir):
    arch = load_arch("sdxl")
    for comp, fixture in [("unet", "sdxl_diffusers_unet_full.json"),
                          ("text_encoder", "sdxl_diffusers_text_encoder_full.json"),
                          ("text_encoder_2", "sdxl_diffusers_text_encoder_2_full.json")]:
        table = keyshapes(real_dir, fixture)
        ours = {name: p.shape for (c, name), p in arch.diffusers_param_map(comp).items()}
        table = {k: tuple(v) for k, v in table.items() if not k.endswith("position_ids")}
        assert ours == table, comp


def test_flux_diffusers_and_aitoolkit_loras_map(real_dir):
    arch = load_arch("flux")
    mods: dict[str, dict[str, list[int]]] = {}
    for key, shape in keyshapes(real_dir, "flux_diffusers_lora_r32.json").items():
        module, _, suffix = key.rpartition(".lora_")
        mods.setdefault(module, {})[suffix] = shape
    for key, tensors in mods.items():
        spec = arch.modules[key]
        _check_lora_shape(spec.shape, tensors["A.weight"], tensors["B.weight"])
    bfl = {}
    for key, shape in keyshapes(real_dir, "flux_aitoolkit_lora_r16.json").items():
        module, _, suffix = key.rpartition(".lora_")
        bfl.setdefault(module.removeprefix("diffusion_model."), {})[suffix] = shape
    for module, tensors in bfl.items():
        entries = arch.checkpoint_map[f"model.diffusion_model.{module}.weight"]
        spec = arch.modules[entries[0][0]]
        _check_lora_shape(spec.shape, tensors["A.weight"], tensors["B.weight"])


@pytest.mark.parametrize(("arch_name", "fixture"), [
    ("sd1", "sd15_diffusers_attnprocs.safetensors"),
    ("sd1", "sd15_diffusers_lora_down_up.safetensors"),
    ("sd2", "sd2_diffusers_attnprocs_unet_prefix.safetensors"),
    ("sd2", "sd2_diffusers_lora_down_up.safetensors"),
])
def test_real_diffusers_unet_loras_match_the_table(real_dir, arch_name, fixture):
    from loratool.io.safetensors import SafetensorsFile

    arch = load_arch(arch_name)
    other = load_arch("sd2" if arch_name == "sd1" else "sd1")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    with SafetensorsFile(real_dir / "adapters" / fixture) as f:
        for key in f.keys():
            path = key.removeprefix("unet.").replace(".processor.", ".").replace("_lora.", ".lora.")
            path = path.replace("to_out.lora", "to_out.0.lora")
            module, _, suffix = path.partition(".lora.")
            pairs.setdefault(f"unet.{module}", {})[suffix] = f.info(key).shape
    assert len(pairs) == 128
    mismatched_other = 0
    for key, t in pairs.items():
        _check_lora_shape(arch.modules[key].shape, list(t["down.weight"]), list(t["up.weight"]))
        mismatched_other += other.modules[key].shape != arch.modules[key].shape
    assert mismatched_other == 32  # attn2.to_k/to_v of all 16 transformers: 768 vs 1024 context width


def test_real_lycoris_lokr_locon_names_map(real_dir):
    """A real SD1 LyCORIS file with conv layers: every kohya id is in the table, shapes agree."""
    import math

    from loratool.io.safetensors import SafetensorsFile

    arch = load_arch("sd1")
    mods: dict[str, dict[str, tuple[int, ...]]] = {}
    with SafetensorsFile(real_dir / "adapters" / "sd15_kohya_lycoris_lokr_r4.safetensors") as f:
        for key in f.keys():
            module, _, suffix = key.partition(".")
            mods.setdefault(module, {})[suffix] = f.info(key).shape
    groups = set()
    for module_id, t in mods.items():
        key = family(arch.name).from_kohya(module_id)
        assert key is not None, module_id
        spec = arch.modules[key]
        groups.add(spec.group)
        w1 = t.get("lokr_w1") or (t["lokr_w1_a"][0], t["lokr_w1_b"][1])
        w2 = t.get("lokr_w2") or (t["lokr_w2_a"][0], *t["lokr_w2_b"][1:])
        assert w1[0] * w2[0] == spec.shape[0], module_id
        assert w1[1] * math.prod(w2[1:]) == math.prod(spec.shape[1:]), module_id
    assert groups == {"attn", "conv"}


@pytest.mark.parametrize("fixture", ["flux_onetrainer_dora_r4.json", "flux_kohya_style_dora_r4.json"])
def test_flux_onetrainer_and_lora_transformer_names_map(real_dir, fixture):
    arch = load_arch("flux")
    mods = _kohya_modules(keyshapes(real_dir, fixture))
    for module_id, tensors in mods.items():
        key = family(arch.name).from_kohya(module_id)
        assert key is not None, module_id
        assert not arch.modules[key].is_fused
        _check_lora_shape(arch.modules[key].shape, tensors["lora_down.weight"], tensors["lora_up.weight"])
        if module_id.startswith("lora_te2_"):  # OneTrainer's T5
            assert key.startswith("text_encoder_2.encoder.block.")
