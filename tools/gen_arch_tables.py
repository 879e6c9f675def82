"""Write the architecture tables in loratool/arch/data/tables/*.json (the module tables of the family entries).

Run:  python tools/gen_arch_tables.py [sd1 sd2 sdxl flux sd3]

The tables are committed data; nothing here runs when loratool is used. The diffusers/transformers
model classes are built from hand-written configs on the meta device (no weights, no hub) to list every
parameter with its shape in diffusers naming. The single-file names (LDM/SGM for SD1/SD2/SDXL, BFL for
Flux, SAI/ComfyUI MMDiT for SD3, OpenCLIP for the SD2 TE and the SDXL TE2) come from the naming rules in
tools/arch_naming.py, one function per family. Per component the JSON holds checkpoint_prefix,
kohya_prefix, params and modules; each parameter row is

    [name, shape, checkpoint_key, rows, op]

`rows` is null (the whole checkpoint tensor), [start, stop] (a slice of rows of a fused tensor) or a list of
[start, stop] ranges whose concatenation gives the diffusers tensor (a row permutation, e.g. BFL's
final_layer modulation where shift and scale trade places). `op` is null, "conv1x1" (the checkpoint
tensor has two trailing 1-dims: VAE attention) or "T" (the checkpoint tensor is the transpose: OpenCLIP
text_projection). Each module row is [path, group, block, kohya id without its prefix]. "fused" lists the
pseudo-modules of fused DiT weights, "checkpoint_extra" regexes of known keys with no diffusers
counterpart, "lbw" the LBW slots, vector subsets and presets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from arch_naming import flux_bfl, openclip, sd3_mmdit, unet_ldm, vae_ldm

OUT = Path(__file__).resolve().parents[1] / "loratool" / "arch" / "data" / "tables"


# ----------------------------------------------------------------------------------------------- models
def _sd_unet(kind: str):
    from diffusers import UNet2DConditionModel

    if kind == "sd1":
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    if kind == "sd2":
        return UNet2DConditionModel(
            cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True
        )
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        transformer_layers_per_block=[1, 2, 10],
        cross_attention_dim=2048,
        attention_head_dim=[5, 10, 20],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _clip(hidden: int, inter: int, layers: int, heads: int, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        vocab_size=49408,
        projection_dim=projection or hidden,
    )
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5xxl():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, vocab_size=32128,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
    )
    return T5EncoderModel(cfg)


def _vae(latent: int):
    from diffusers import AutoencoderKL

    quant = latent == 4
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=latent,
        use_quant_conv=quant,
        use_post_quant_conv=quant,
    )


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(guidance_embeds=True)


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192,
    )


def _state(model, clip: bool) -> tuple[dict[str, tuple], list[tuple[str, tuple]]]:
    """Every saved tensor (name -> shape) and every Linear/Conv2d (path -> weight shape)."""
    keys = set(model.state_dict())
    names = {n: tuple(p.shape) for n, p in model.named_parameters()}
    names.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in keys})
    mods = [
        (n, tuple(m.weight.shape))
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    ]
    if clip:  # transformers 5 keeps text_model. for CLIPTextModel only at state_dict level: normalise
        fix = lambda n: n if n.startswith(("text_model.", "text_projection")) else "text_model." + n  # noqa: E731
        names = {fix(n): s for n, s in names.items()}
        mods = [(fix(n), s) for n, s in mods]
    names.pop("encoder.embed_tokens.weight", None)  # T5: tied to shared.weight
    return names, mods


# ------------------------------------------------------------------------------------------ assembly
def _unet_group(path: str) -> str:
    if ".attentions." in path:
        return "attn"
    if ".resnets." in path or "samplers." in path:
        return "conv"
    return "other"


def _te_group(path: str) -> str:
    return "attn" if re.search(r"\.(self_attn|mlp|SelfAttention|DenseReluDense)\.", path) else "other"


def _sd_block(ldm: str, last_out: int) -> str:
    if m := re.match(r"input_blocks\.(\d+)\.", ldm):
        return f"IN{int(m[1]):02d}"
    if ldm.startswith("middle_block."):
        return "MID"
    if m := re.match(r"output_blocks\.(\d+)\.", ldm):
        return f"OUT{int(m[1]):02d}"
    if ldm.startswith(("time_embed.", "label_emb.")):
        return "IN00"
    if ldm.startswith("out."):
        return f"OUT{last_out:02d}"
    raise KeyError(ldm)


def _dit_block(ckey: str) -> str:
    for pat, fmt in ((r"double_blocks\.(\d+)\.", "D{:02d}"), (r"single_blocks\.(\d+)\.", "S{:02d}"),
                     (r"joint_blocks\.(\d+)\.", "J{:02d}")):
        if m := re.match(pat, ckey):
            return fmt.format(int(m[1]))
    return "OUT" if ckey.startswith("final_layer.") else "IN"


def _component(model, clip, ckpt_prefix, namer, kohya_prefix, group, block, kohya_names):
    """One component's rows: params [name, shape, ckey, rows, op] and modules [path, group, block, kohya]."""
    names, mods = _state(model, clip)
    params = []
    for name, shape in names.items():
        ckey, rows, op = namer(name)
        params.append([name, list(shape), ckey, rows, op])
    cmap = {p[0]: p for p in params}
    modules = []
    for path, _shape in mods if kohya_prefix else []:
        ckey = cmap[path + ".weight"][2]
        cpath = ckey.removesuffix(".weight")
        kid = path if kohya_names == "diffusers" else cpath
        modules.append([path, group(path), block(cpath), kid.replace(".", "_")])
    return {"checkpoint_prefix": ckpt_prefix, "kohya_prefix": kohya_prefix,
            "params": params, "modules": modules}


def _plain(name):
    return name, None, None


def _with_op(fn):
    def namer(name):
        out, op = fn(name)
        return out, None, op
    return namer


def build_sd(kind: str) -> dict:
    unet = _sd_unet(kind)
    up_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    last_out = 3 * len(unet.up_blocks) - 1
    comps = {}
    comps["unet"] = _component(
        unet, False, "model.diffusion_model.", lambda n: (unet_ldm(n, up_attn), None, None), "lora_unet",
        _unet_group, lambda c: _sd_block(c, last_out), "checkpoint" if kind == "sdxl" else "diffusers")
    te_block = lambda c: "BASE"  # noqa: E731
    if kind == "sd1":
        comps["text_encoder"] = _component(_clip(768, 3072, 12, 12), True, "cond_stage_model.transformer.",
                                           _plain, "lora_te", _te_group, te_block, "diffusers")
    elif kind == "sd2":
        comps["text_encoder"] = _component(_clip(1024, 4096, 23, 16), True, "cond_stage_model.model.",
                                           lambda n: openclip(n, 1024), "lora_te", _te_group, te_block,
                                           "diffusers")
    else:
        comps["text_encoder"] = _component(_clip(768, 3072, 12, 12), True, "conditioner.embedders.0.transformer.",
                                           _plain, "lora_te1", _te_group, te_block, "diffusers")
        comps["text_encoder_2"] = _component(_clip(1280, 5120, 32, 20, projection=1280), True,
                                             "conditioner.embedders.1.model.", lambda n: openclip(n, 1280),
                                             "lora_te2", _te_group, te_block, "diffusers")
    comps["vae"] = _component(_vae(4), False, "first_stage_model.", _with_op(vae_ldm), None,
                              lambda p: "other", lambda c: None, "diffusers")
    return comps


def build_flux() -> dict:
    comps = {
        "transformer": _component(_flux(), False, "model.diffusion_model.", flux_bfl, "lora_unet",
                                  lambda p: "attn" if "transformer_blocks." in p else "other",
                                  _dit_block, "checkpoint"),
        "text_encoder": _component(_clip(768, 3072, 12, 12), True, "text_encoders.clip_l.transformer.", _plain,
                                   "lora_te1", _te_group, lambda c: "CLIP", "diffusers"),
        "text_encoder_2": _component(_t5xxl(), False, "text_encoders.t5xxl.transformer.", _plain, "lora_te3",
                                     _te_group, lambda c: "T5", "diffusers"),
        "vae": _component(_vae(16), False, "vae.", _with_op(vae_ldm), None, lambda p: "other",
                          lambda c: None, "diffusers"),
    }
    return comps


def build_sd3() -> dict:
    base = lambda c: "BASE"  # noqa: E731
    return {
        "transformer": _component(_sd3(), False, "model.diffusion_model.", sd3_mmdit, "lora_unet",
                                  lambda p: "attn" if "transformer_blocks." in p else "other",
                                  _dit_block, "checkpoint"),
        "text_encoder": _component(_clip(768, 3072, 12, 12, projection=768), True,
                                   "text_encoders.clip_l.transformer.", _plain, "lora_te1", _te_group, base,
                                   "diffusers"),
        "text_encoder_2": _component(_clip(1280, 5120, 32, 20, projection=1280), True,
                                     "text_encoders.clip_g.transformer.", _plain, "lora_te2", _te_group, base,
                                     "diffusers"),
        "text_encoder_3": _component(_t5xxl(), False, "text_encoders.t5xxl.transformer.", _plain, "lora_te3",
                                     _te_group, base, "diffusers"),
        "vae": _component(_vae(16), False, "first_stage_model.", _with_op(vae_ldm), None, lambda p: "other",
                          lambda c: None, "diffusers"),
    }


def add_fused(comps: dict) -> dict:
    """Pseudo-modules for fused single-file weights of a DiT (BFL qkv/linear1, MMDiT qkv)."""
    fused: dict[str, dict] = {}
    tr = comps["transformer"]
    by_ckey: dict[str, list] = {}
    for name, _shape, ckey, rows, _op in tr["params"]:
        if name.endswith(".weight") and rows and isinstance(rows[0], int):
            by_ckey.setdefault(ckey, []).append((name.removesuffix(".weight"), rows))
    mods = {m[0]: m for m in tr["modules"]}
    for ckey, parts in by_ckey.items():
        parts.sort(key=lambda part: part[1][0])
        first = parts[0][0]
        block = first.rsplit(".attn.", 1)[0]
        leaves = {p.rsplit(".", 1)[-1] for p, _ in parts}
        if "proj_mlp" in leaves:
            path = f"{block}.to_qkv_mlp"
        elif "add_q_proj" in leaves:
            path = f"{block}.attn.to_added_qkv"
        else:
            path = f"{block}.attn.to_qkv"
        stop = max(r[1] for _, r in parts)
        width = next(s for n, s, *_ in tr["params"] if n == first + ".weight")[1]
        m = mods[first]
        fused[f"transformer.{path}"] = {
            "shape": [stop, width], "checkpoint_key": ckey, "group": m[1], "block": m[2], "kohya": m[3],
            "parts": [[f"transformer.{p}", r[0], r[1]] for p, r in parts],
        }
    return fused


_SCHED = r"^(betas|alphas_cumprod|alphas_cumprod_prev|log_one_minus_alphas_cumprod|posterior_\w+|sqrt_\w+)$"
EXTRA = {
    "sd1": [_SCHED, r"^model_ema\.", r"\.position_ids$"],
    "sd2": [_SCHED, r"^model_ema\.", r"^cond_stage_model\.model\.transformer\.resblocks\.23\.",
            r"^cond_stage_model\.model\.(text_projection|logit_scale)$"],
    "sdxl": [_SCHED, r"\.position_ids$", r"^conditioner\.embedders\.1\.model\.logit_scale$",
             r"^(edm_vpred\.sigma_max|edm_vpred\.sigma_min|v_pred|ztsnr)$"],
    "flux": [r"\.position_ids$"],
    "sd3": [r"\.position_ids$", r"^text_encoders\.\w+\.logit_scale$", r"^model\.model_sampling\.sigmas$"],
}

_SD1_17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(3, 12)]
# the named 17-slot presets of the LoRA Block Weight extension (also used by supermerger)
_SD1_PRESETS = {
    "NONE": [0] * 17, "ALL": [1] * 17,
    "INS": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "IND": [1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "INALL": [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "MIDD": [1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTD": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    "OUTS": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
    "OUTALL": [1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "ALL0.5": [0.5] * 17,
}


def lbw_table(kind: str) -> dict:
    if kind in ("sd1", "sd2"):
        slots = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]
        return {"slots": slots, "vectors": {"17": _SD1_17, "26": slots}, "presets": {"17": _SD1_PRESETS}}
    if kind == "sdxl":
        slots = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["MID"] + [f"OUT{i:02d}" for i in range(9)]
        v12 = ["BASE", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(6)]
        return {"slots": slots, "vectors": {"12": v12, "20": slots}, "presets": {}}
    if kind == "flux":
        slots = ["CLIP", "T5", "IN"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["OUT"]
        return {"slots": slots, "vectors": {"61": slots}, "presets": {}}
    slots = ["BASE", "IN"] + [f"J{i:02d}" for i in range(24)] + ["OUT"]
    return {"slots": slots, "vectors": {str(len(slots)): slots}, "presets": {}}


def build(kind: str) -> dict:
    with torch.device("meta"):
        comps = build_flux() if kind == "flux" else build_sd3() if kind == "sd3" else build_sd(kind)
    fused = add_fused(comps) if kind in ("flux", "sd3") else {}
    return {"name": kind, "components": [c for c in comps if c != "vae"], "tables": comps,
            "fused": fused, "checkpoint_extra": EXTRA[kind], "lbw": lbw_table(kind)}


def dump(obj, indent: int = 0) -> str:
    """JSON with one table row per line: small diffs, still compact."""
    pad = " " * indent
    if isinstance(obj, dict) and indent < 6:
        items = [f'{pad}  {json.dumps(k)}: {dump(v, indent + 2).lstrip()}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}" if items else "{}"
    if isinstance(obj, list) and obj and isinstance(obj[0], list):
        rows = [f"{pad}  {json.dumps(r, separators=(',', ':'))}" for r in obj]
        return "[\n" + ",\n".join(rows) + f"\n{pad}]"
    return json.dumps(obj, separators=(",", ":"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("archs", nargs="*", default=["sd1", "sd2", "sdxl", "flux", "sd3"])
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for kind in args.archs:
        text = dump(build(kind)) + "\n"
        (OUT / f"{kind}.json").write_text(text)
        print(f"{kind}: {len(text) / 1e3:.0f} kB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
