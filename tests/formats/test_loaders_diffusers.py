"""Our kohya and diffusers outputs go through diffusers' own loaders with every module matched, and
the fused weights are base + our ΔW (relative error < 1e-5 in fp32).

Tiny UNets with the real SD1/SDXL block structure and tiny CLIP encoders (convert_models.py), random
weights, no hub. The loading path is what ``pipeline.load_lora_weights(file)`` runs.
"""

from __future__ import annotations

import re

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import convert_models as cm  # noqa: E402
import torch  # noqa: E402

from loratool.formats import read_adapter, write_adapter  # noqa: E402
from loratool.ops.convert import convert  # noqa: E402

# what kohya's trainer targets: transformer-block children, resnets, samplers, CLIP attention and MLP
UNET_TARGETS = re.compile(r"(attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\..*)"
                          r"|resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)|samplers\.0\.conv)$")
TE_TARGETS = re.compile(r"(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
# diffusers 0.42's kohya path keys attention-processor alphas under a name no module has (reference/hf.md
# §2.5), and keys text-encoder alphas with ``text_model.``, which a transformers-5 CLIP no longer has:
# those modules only load right at the most common alpha. Every other module's alpha may differ.
ATTN_PROC = re.compile(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


DEEP = re.compile(r"transformer_blocks\.([2-8])\.")  # SDXL's 10-deep blocks: depth 0, 1 and 9 carry every name


def select(component: str, path: str) -> bool:
    if DEEP.search(path):
        return False
    return bool((TE_TARGETS if component.startswith("text_encoder") else UNET_TARGETS).search(path))


def alpha_rule(uniform_attention: bool):
    def alpha(component: str, path: str) -> float:
        if uniform_attention and (ATTN_PROC.search(path) or component.startswith("text_encoder")):
            return 2.0
        h = sum(map(ord, path))
        return 2.0 if h % 7 else 1.0 + h % 5  # one module in 7 off the common alpha (alpha_pattern)

    return alpha


def rank_rule(component: str, path: str) -> int:
    # one module in 8 off the common rank (rank_pattern); peft matches every pattern against every
    # module, so a pattern per module would make loading a tiny SDXL take minutes
    return 2 if len(path) % 8 == 0 else 4


def _models(kind: str) -> dict[str, torch.nn.Module]:
    if kind == "sd1":
        return {"unet": cm.model("sd1"), "text_encoder": cm.model("te")}
    return {"unet": cm.model("sdxl"), "text_encoder": cm.model("te"), "text_encoder_2": cm.model("te2")}


@pytest.mark.parametrize("kind", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
@pytest.mark.parametrize("target", ["kohya", "diffusers"])
def test_output_loads_in_diffusers_with_every_module_matched(tmp_path, kind, target):
    models = _models(kind)
    base = {c: cm.model({"unet": kind, "text_encoder": "te", "text_encoder_2": "te2"}[c]) for c in models}
    adapter = cm.random_adapter(models, select, seed=11, rank=rank_rule,
                                alpha=alpha_rule(uniform_attention=target == "kohya"), base_model=kind)
    converted, report = convert(adapter, target)
    assert report.exact
    out = tmp_path / "lora.safetensors"
    write_adapter(converted, out, target)
    messages = cm.load_diffusers(out, models["unet"], models["text_encoder"], models.get("text_encoder_2"),
                                 sdxl=kind == "sdxl")
    _every_module_loaded_exactly(messages, models, base, adapter)


def _every_module_loaded_exactly(messages, models, base, adapter) -> None:
    """No loader complaint, a LoRA layer on every module of the adapter and nothing else, fused weight =
    base + our ΔW."""
    assert cm.problems(messages) == []
    for comp, m in models.items():
        want = {mod.path for mod in adapter.modules.values() if mod.component == comp}
        assert cm.lora_layers(m) == want, comp
        cm.merge_all(m)
        errors = cm.fused_errors(m, base[comp], adapter, comp)
        assert len(errors) == len(want) and max(errors.values()) < 1e-5, (comp, max(errors.values()))


def test_capture_sees_the_known_diffusers_alpha_bug(tmp_path):
    """The harness can fail: a kohya file whose attention modules differ in alpha is mis-scaled by
    diffusers's kohya path, and the capture reports the unmatched alpha_pattern keys."""
    models = {"unet": cm.model("sd1")}
    base = cm.model("sd1")
    adapter = cm.random_adapter(models, lambda c, p: bool(ATTN_PROC.search(p)) and "down_blocks.0" in p, seed=3,
                                alpha=lambda c, p: 4.0 if p.endswith("to_q") else 1.0, base_model="sd1")
    out = tmp_path / "lora.safetensors"
    write_adapter(convert(adapter, "kohya")[0], out, "kohya")
    messages = cm.load_diffusers(out, models["unet"])
    assert any("alpha_pattern" in m and "did not match" in m for m in messages)
    cm.merge_all(models["unet"])
    errors = cm.fused_errors(models["unet"], base, adapter, "unet")
    assert max(errors.values()) > 0.1  # diffusers's bug, not ours: the same file read by us is exact
    again = read_adapter(out)
    for key, module in adapter.modules.items():
        assert torch.allclose(again.modules[key].delta(), module.delta(), rtol=1e-6, atol=0)


def test_kohya_file_from_transformers5_clip_spelling_loads(tmp_path):
    """Text-encoder paths without ``text_model.`` (transformers 5 saves) are written with it."""
    te = cm.model("te")
    base = cm.model("te")
    adapter = cm.random_adapter({"text_encoder": te}, select, seed=5, base_model="sd1")
    for m in adapter.modules.values():
        assert m.path.startswith("text_model.")
    out = tmp_path / "te.safetensors"
    write_adapter(convert(adapter, "kohya")[0], out, "kohya")
    from loratool.io.safetensors import SafetensorsFile

    with SafetensorsFile(out) as f:
        assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in f.keys())
    messages = cm.load_diffusers(out, None, te)
    assert cm.problems(messages) == []
    cm.merge_all(te)
    assert max(cm.fused_errors(te, base, adapter, "text_encoder").values()) < 1e-5


ATTENTION = re.compile(r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)$")


@pytest.mark.parametrize("target", ["diffusers-attnproc", "diffusers-old"])
def test_old_diffusers_layouts_we_write_load_in_current_diffusers(tmp_path, target):
    """The attention-processor layout (unet.<attention>.processor.to_q_lora…) and diffusers 0.21's
    lora.down / lora_linear_layer: today's diffusers still converts both; every module matched, exact ΔW."""
    models = {"unet": cm.model("sd1"), "text_encoder": cm.model("te")}
    base = {"unet": cm.model("sd1"), "text_encoder": cm.model("te")}
    keep = (lambda c, p: bool(ATTENTION.search(p))) if target == "diffusers-attnproc" else select
    adapter = cm.random_adapter(models, lambda c, p: select(c, p) and keep(c, p), seed=13, rank=rank_rule,
                                alpha=alpha_rule(uniform_attention=False), base_model="sd1")
    converted, report = convert(adapter, target)
    assert report.exact
    out = tmp_path / "lora.safetensors"
    write_adapter(converted, out, target)
    assert read_adapter(out).source_format == target
    messages = cm.load_diffusers(out, models["unet"], models["text_encoder"])
    _every_module_loaded_exactly(messages, models, base, adapter)
