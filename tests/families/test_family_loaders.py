"""Our outputs for the new families go through diffusers' own loaders (the family's ``LoraLoaderMixin``:
``lora_state_dict`` with its converters, then ``load_lora_into_transformer``) into tiny random transformers built
with diffusers' own classes: every module matched, no loader complaint, and the fused weights are base + our ΔW.

Which output loads where is what diffusers 0.42 reads (docs/FAMILIES.md has the matrix): the diffusers layout
for every family; kohya/musubi ids where a converter exists (Wan's musubi converter wants whole blocks, Flux's
kohya converter knows the blocks only); single-file names under ``diffusion_model.`` (bfl) where a converter or
a prefix swap exists. Where diffusers' converter hard-codes the real widths (HunyuanVideo's single-block
``linear1`` split, Lumina 2's q/k/v, Flux's kohya ``linear1``), the converter itself is run on our file at the
real width (no model needed) and its result compared with ours.
"""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import family_models as fm  # noqa: E402
import torch  # noqa: E402

from loratool.arch import family  # noqa: E402
from loratool.core.modules import Adapter, LoraModule  # noqa: E402
from loratool.formats import encode, read_adapter, write_adapter  # noqa: E402
from loratool.ops.convert import convert  # noqa: E402

ALL = fm.pattern(".")
BLOCKS = fm.pattern(r"^(blocks|transformer_blocks|single_transformer_blocks)\.")
NOT_LINEAR1 = fm.pattern(r"^(transformer_blocks|single_transformer_blocks\.\d+\.proj_out)")  # Flux-like, no linear1
# diffusers' HunyuanVideo converter splits linear1 at the real width (checked apart below); it also cuts the
# token refiner's q/k/v lora_A into row thirds and swaps the row halves of the final modulation's lora_A as of its
# lora_B: wrong for any file, so those modules are left out
HUNYUAN = fm.pattern(r"^(transformer_blocks|single_transformer_blocks\.\d+\.(proj_out|norm)|time_text_embed|"
                     r"proj_out|context_embedder\.(proj_in|time_text_embed|token_refiner\.refiner_blocks\.\d+\."
                     r"(norm_out|ff|attn\.to_out)))")
LOADS = [(name, "diffusers", ALL) for name in fm.TINY] + [
    ("wan", "kohya", BLOCKS), ("wan-i2v", "musubi", BLOCKS), ("wan", "bfl", ALL), ("wan-i2v", "bfl", ALL),
    ("qwen-image", "kohya", ALL), ("qwen-image", "musubi", ALL), ("qwen-image", "bfl", ALL),
    ("z-image", "musubi", ALL), ("chroma", "kohya", NOT_LINEAR1), ("flux-kontext", "kohya", NOT_LINEAR1),
    ("hunyuan-video", "bfl", HUNYUAN), ("hidream", "bfl", ALL), ("ltx-video", "bfl", BLOCKS),
]


@pytest.mark.parametrize("name,layout,select", LOADS, ids=[f"{n}-{lay}" for n, lay, _ in LOADS])
def test_output_loads_in_diffusers(tmp_path, name, layout, select):
    a = fm.adapter(name, select)
    converted, report = convert(a, layout)
    assert report.exact
    out = tmp_path / "lora.safetensors"
    write_adapter(converted, out, layout)
    assert read_adapter(out).base_model == fm.FAMILY.get(name, name)
    m, base = fm.model(name), fm.model(name)
    assert fm.check_loaded(fm.load(name, out, m), m, base, a) < 1e-5


# ------------------------------------------------------------------ diffusers' converters at the real widths

def _adapter(fam_name: str, keys: list[str], seed: int = 0, rank: int = 1) -> Adapter:
    """Rank-``rank`` random modules at the family's real shapes (its default sizes)."""
    fam = family(fam_name)
    g = torch.Generator().manual_seed(seed)
    a = Adapter(base_model=fam_name)
    for i, key in enumerate(keys):
        out, inp = fam.shape(key)
        comp, _, path = key.partition(".")
        a.add(LoraModule(comp, path, alpha=float(1 + i % 3), down=torch.randn(rank, inp, generator=g) * 0.1,
                         up=torch.randn(out, rank, generator=g) * 0.1))
    return a


def _same(a: Adapter, theirs: dict) -> None:
    """Ours equal to the converter's output; the untrained parts of a fused weight it returns are exact zeros."""
    ours = fm.factors(a, a.base_model)
    for path in set(theirs) - set(ours):
        assert not theirs[path][0].any(), path
        ours[path] = theirs[path]
    fm.same(ours, theirs)


def _tensors(a: Adapter, layout: str) -> dict[str, torch.Tensor]:
    converted, _ = convert(a, layout)
    return encode(converted, layout)[0]


def test_hunyuan_single_block_linear1_through_diffusers_converter():
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    parts = [f"transformer.single_transformer_blocks.3.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    a = _adapter("hunyuan-video", parts + ["transformer.transformer_blocks.1.attn.add_v_proj"])
    tensors = _tensors(a, "bfl")
    assert "diffusion_model.single_blocks.3.linear1.lora_A.weight" in tensors
    _same(a, fm.oracle(_convert_hunyuan_video_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})))


def test_lumina2_fused_gqa_qkv_through_diffusers_converter():
    """diffusers' Lumina 2 converter wants every module of a block and splits q/k/v at [2304, 768, 768]."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lumina2_lora_to_diffusers

    block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "feed_forward.linear_1", "feed_forward.linear_2",
             "feed_forward.linear_3", "norm1.linear"]
    a = _adapter("lumina2", [f"transformer.layers.0.{p}" for p in block])
    tensors = _tensors(a, "bfl")
    assert tensors["diffusion_model.layers.0.attention.qkv.lora_B.weight"].shape[0] == 2304 + 2 * 768
    _same(a, fm.oracle(_convert_non_diffusers_lumina2_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})))


@pytest.mark.parametrize("fam_name", ["flux-kontext", "chroma"])
def test_flux_kohya_linear1_through_diffusers_converter(fam_name):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    parts = [f"transformer.single_transformer_blocks.7.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    a = _adapter(fam_name, parts + ["transformer.transformer_blocks.2.attn.to_k"], rank=2)
    tensors = _tensors(a, "kohya")
    assert "lora_unet_single_blocks_7_linear1.lora_down.weight" in tensors
    _same(a, fm.oracle(_convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})))


NOT_READ = [("hunyuan-video", "kohya"), ("z-image", "kohya"), ("lumina2", "kohya"), ("sd3", "kohya"),
            ("chroma", "bfl")]


@pytest.mark.parametrize("name,layout", NOT_READ, ids=[f"{n}-{lay}" for n, lay in NOT_READ])
def test_outputs_diffusers_does_not_read(tmp_path, name, layout):
    """The cells docs/FAMILIES.md marks ✗ for diffusers: its loader refuses the file or leaves modules out (no
    converter for kohya ids on HunyuanVideo, Lumina 2 and SD3; no q/k/v split on Z-Image; no path for BFL names
    on Chroma), so diffusers users get --to diffusers."""
    a = fm.adapter(name, ALL)
    converted, _ = convert(a, layout)
    out = tmp_path / "lora.safetensors"
    write_adapter(converted, out, layout)
    m = fm.model(name)
    try:
        messages = fm.load(name, out, m)
    except Exception:  # noqa: BLE001 - any refusal of diffusers' is the finding
        return
    assert fm.cm.problems(messages) or fm.cm.lora_layers(m) != {mod.path for mod in a.modules.values()}


@pytest.mark.parametrize("name", sorted(fm.TINY))
def test_peft_output_loads_in_peft(tmp_path, name):
    """``--to peft`` for every family: peft's own PeftModel.from_pretrained on the tiny transformer puts a LoRA on
    exactly our modules (per-module alphas and ranks through alpha_pattern/rank_pattern), each with our ΔW."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    a = fm.adapter(name, ALL)
    converted, report = convert(a, "peft")
    assert report.exact
    write_adapter(converted, tmp_path / "peft", "peft")
    with fm.cm.captured() as messages:
        model = PeftModel.from_pretrained(fm.model(name), str(tmp_path / "peft"))
    assert fm.cm.problems(messages) == []
    deltas = {n: m.get_delta_weight("default").double() for n, m in model.base_model.model.named_modules()
              if isinstance(m, LoraLayer) and "default" in m.lora_A}
    assert set(deltas) == {m.path for m in a.modules.values()}
    for m in a.modules.values():
        want = m.delta(torch.float64)
        assert float((deltas[m.path] - want).norm() / want.norm()) < 1e-6, m.path
