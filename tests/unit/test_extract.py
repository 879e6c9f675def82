"""extract as a library call, on tiny checkpoints built here, against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from loratool.errors import LoraToolError
from loratool.io.writer import write_safetensors
from loratool.linalg import SvdPolicy, parse_rank_mode
from loratool.ops.extract import extract, plan_extract
from loratool.ops.extract_plan import ExtractOptions


def low_rank(shape, rank, gen, scale=0.1):
    m, n = shape[0], math.prod(shape[1:])
    return (torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) * scale / rank).reshape(shape)


def pair(tmp_path, base: dict, deltas: dict, dtype=torch.float32):
    tuned = {k: (v.float() + deltas[k]).to(dtype) if k in deltas else v.to(dtype) for k, v in base.items()}
    b, t = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    write_safetensors(b, {k: v.to(dtype) for k, v in base.items()}, None)
    write_safetensors(t, tuned, None)
    return b, t


def dense(module) -> torch.Tensor:
    return module.delta(torch.float64)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def test_generic_recovers_exact_low_rank_deltas_linear_and_convs(tmp_path, gen):
    shapes = {"lin.weight": (96, 160), "conv3.weight": (48, 24, 3, 3), "conv1.weight": (64, 32, 1, 1)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    base["norm.weight"] = torch.randn(96, generator=gen)
    deltas = {k: low_rank(s, 4, gen) for k, s in shapes.items()}
    b, t = pair(tmp_path, base, deltas)
    res = extract(b, t, ExtractOptions(rank=6, arch="generic", dtype="fp32"))
    assert sorted(res.adapter.modules) == ["model.conv1", "model.conv3", "model.lin"]
    for k, d in deltas.items():
        mod = res.adapter.modules["model." + k.removesuffix(".weight")]
        want = (base[k] + d).double() - base[k].double()
        assert float((dense(mod) - want).norm() / want.norm()) < 1e-5
        assert mod.alpha == mod.rank == 6
    conv3 = res.adapter.modules["model.conv3"]
    assert tuple(conv3.down.shape) == (6, 24, 3, 3) and tuple(conv3.up.shape) == (48, 6, 1, 1)
    assert all(r.rel_error < 1e-5 and r.retained > 1 - 1e-6 for r in res.reports)


def test_error_is_within_one_percent_of_optimal_and_reported(tmp_path, gen):
    m, n = 256, 384
    u = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, m, generator=gen, dtype=torch.float64))[0]
    d = (u @ torch.diag(torch.arange(1, m + 1, dtype=torch.float64) ** -0.6) @ v.T).float()
    b, t = pair(tmp_path, {"w.weight": torch.randn(m, n, generator=gen)}, {"w.weight": d})
    res = extract(b, t, ExtractOptions(rank=16, arch="generic", dtype="fp32"))
    from loratool.io.safetensors import load_file
    delta = load_file(t)["w.weight"].double() - load_file(b)["w.weight"].double()
    s = torch.linalg.svdvals(delta)
    optimal = float(s[16:].square().sum().sqrt() / s.square().sum().sqrt())
    (rep,) = res.reports
    got = float((dense(res.adapter.modules["model.w"]) - delta).norm() / delta.norm())
    assert got <= 1.01 * optimal
    assert rep.rel_error == pytest.approx(got, rel=1e-3)
    assert rep.retained == pytest.approx(1 - got**2, rel=1e-3)


def test_two_runs_give_identical_factors_and_bf16_inputs_work(tmp_path, gen):
    base = {"a.weight": torch.randn(128, 200, generator=gen), "b.weight": torch.randn(128, 200, generator=gen)}
    deltas = {k: low_rank(v.shape, 30, gen) for k, v in base.items()}
    b, t = pair(tmp_path, base, deltas, dtype=torch.bfloat16)
    opts = ExtractOptions(rank=8, arch="generic")
    r1, r2 = extract(b, t, opts), extract(b, t, opts)
    assert r1.dtype == torch.bfloat16
    for k, m in r1.adapter.modules.items():
        assert m.up.dtype == torch.bfloat16
        assert torch.equal(m.up, r2.adapter.modules[k].up) and torch.equal(m.down, r2.adapter.modules[k].down)
    r3 = extract(b, t, ExtractOptions(rank=8, arch="generic", policy=SvdPolicy(seed=1)))
    assert not torch.equal(r3.adapter.modules["model.a"].down, r1.adapter.modules["model.a"].down)


def test_unchanged_and_zero_layers_are_skipped_and_reported(tmp_path, gen):
    base = {"same.weight": torch.randn(64, 64, generator=gen), "moved.weight": torch.randn(64, 64, generator=gen)}
    b, t = pair(tmp_path, base, {"moved.weight": low_rank((64, 64), 2, gen)})
    res = extract(b, t, ExtractOptions(rank=4, arch="generic"))
    assert list(res.adapter.modules) == ["model.moved"]
    # a generic pair's modules are reported by the file's own names (no "model." put in front)
    assert res.summary["skipped_unchanged"] == ["same"]
    assert '"modules":{"moved":[4,' in res.compact_report()


def test_dynamic_rank_is_minimal(tmp_path, gen):
    m = 128
    q = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))[0]
    s = torch.tensor([8.0, 4.0, 2.0, 1.0] + [1e-3] * 4, dtype=torch.float64)
    d = (q[:, :8] @ torch.diag(s) @ q[:, 8:16].T).float()
    b, t = pair(tmp_path, {"w.weight": torch.zeros(m, m)}, {"w.weight": d})
    for mode, want in (("fro:0.9", 2), ("fro:0.99", 3), ("ratio:3", 2), ("cumulative:0.9", 3), ("fixed", 16)):
        res = extract(b, t, ExtractOptions(rank=16, arch="generic", rank_mode=parse_rank_mode(mode)))
        assert res.adapter.modules["model.w"].rank == want, mode
        assert res.adapter.modules["model.w"].alpha == want


def test_mismatches_are_one_clear_error(tmp_path, gen):
    a = {"x.weight": torch.randn(8, 8, generator=gen)}
    write_safetensors(tmp_path / "a.safetensors", a, None)
    write_safetensors(tmp_path / "b.safetensors", {"x.weight": torch.randn(8, 9, generator=gen)}, None)
    write_safetensors(tmp_path / "c.safetensors", {**a, "y.weight": a["x.weight"]}, None)
    with pytest.raises(LoraToolError, match=r"tensor x\.weight has shape \[8, 8\] in BASE but \[8, 9\]"):
        extract(tmp_path / "a.safetensors", tmp_path / "b.safetensors", ExtractOptions(rank=2, arch="generic"))
    with pytest.raises(LoraToolError, match=r"tensor y\.weight is missing"):
        extract(tmp_path / "a.safetensors", tmp_path / "c.safetensors", ExtractOptions(rank=2, arch="generic"))


def test_clamp_is_off_by_default_and_clamps_when_asked(tmp_path, gen):
    base = {"w.weight": torch.randn(64, 96, generator=gen)}
    b, t = pair(tmp_path, base, {"w.weight": low_rank((64, 96), 8, gen)})
    plain = extract(b, t, ExtractOptions(rank=8, arch="generic", dtype="fp32")).adapter.modules["model.w"]
    clamped = extract(b, t, ExtractOptions(rank=8, arch="generic", dtype="fp32", clamp_quantile=0.9))
    cm = clamped.adapter.modules["model.w"]
    pooled = torch.cat([plain.up.flatten(), plain.down.flatten()])
    hi = float(torch.quantile(pooled, 0.9))
    assert float(cm.up.abs().max()) <= hi * (1 + 1e-5) < float(plain.up.abs().max())
    assert clamped.reports[0].rel_error > 1e-3 > extract(b, t, ExtractOptions(rank=8, arch="generic")).reports[0].rel_error


SD1_ATTN = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
SD1_CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
SD1_TE = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
SD1_TE2 = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def test_sd1_layout_targets_text_encoder_threshold_and_filters(tmp_path, gen):
    base = {SD1_ATTN: torch.randn(320, 320, generator=gen), SD1_CONV: torch.randn(320, 320, 3, 3, generator=gen) * .1,
            SD1_TE: torch.randn(768, 768, generator=gen), SD1_TE2: torch.randn(768, 768, generator=gen)}
    deltas = {SD1_ATTN: low_rank((320, 320), 4, gen), SD1_CONV: low_rank((320, 320, 3, 3), 4, gen),
              SD1_TE: low_rank((768, 768), 4, gen, scale=1e-3), SD1_TE2: low_rank((768, 768), 4, gen, scale=30)}
    b, t = pair(tmp_path, base, deltas, dtype=torch.float16)
    plan = plan_extract(b, t, ExtractOptions(rank=4))
    assert plan.arch == "sd1" and len(plan.modules) == 3 and len(plan.missing) == 264 - 3
    res = extract(b, t, ExtractOptions(rank=4))
    keys = sorted(res.adapter.modules)
    assert keys == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
                    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert res.summary["skipped_below_min_change"] == ["text_encoder.text_model.encoder.layers.0.self_attn.k_proj"]
    res = extract(b, t, ExtractOptions(rank=4, targets="attn+conv", exclude=("text_encoder",), conv_rank=2))
    assert sorted(res.adapter.modules) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                           "unet.down_blocks.0.resnets.0.conv1"]
    assert res.adapter.modules["unet.down_blocks.0.resnets.0.conv1"].rank == 2
    assert res.adapter.base_model == "sd1" and len(res.summary["excluded"]) == 2


def test_sdxl_fused_in_proj_rows_are_read_per_module(tmp_path, gen):
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    base = {key: torch.randn(3840, 1280, generator=gen)}
    d = torch.zeros(3840, 1280)
    d[1280:2560] = low_rank((1280, 1280), 3, gen)  # only k changes
    b, t = pair(tmp_path, base, {key: d})
    res = extract(b, t, ExtractOptions(rank=3, dtype="fp32"))
    assert res.plan.arch == "sdxl"
    assert list(res.adapter.modules) == ["text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj"]
    got = dense(res.adapter.modules["text_encoder_2.text_model.encoder.layers.0.self_attn.k_proj"])
    assert float((got - d[1280:2560].double()).norm() / d[1280:2560].norm()) < 1e-5
    assert sorted(res.summary["skipped_unchanged"]) == [
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj"]


def test_diffusers_folder_and_component_file(tmp_path, gen):
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    k2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    te = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    unet = {q: torch.randn(320, 320, generator=gen), k2: torch.randn(320, 768, generator=gen)}
    text = {te: torch.randn(768, 768, generator=gen)}
    d_unet = {q: low_rank((320, 320), 2, gen), k2: low_rank((320, 768), 2, gen)}
    d_text = {te: low_rank((768, 768), 2, gen, scale=20)}
    for name, (u, t) in {"base": (unet, text), "tuned": ({k: v + d_unet[k] for k, v in unet.items()},
                                                         {k: v + d_text[k] for k, v in text.items()})}.items():
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "text_encoder").mkdir()
        write_safetensors(tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors", u, None)
        write_safetensors(tmp_path / name / "text_encoder" / "model.safetensors", t, None)
    res = extract(tmp_path / "base", tmp_path / "tuned", ExtractOptions(rank=2, dtype="fp32"))
    assert res.plan.arch == "sd1"
    assert sorted(res.adapter.modules) == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert max(r.rel_error for r in res.reports) < 1e-5
    # a bare component file (diffusers keys of the U-Net alone), architecture given
    res = extract(tmp_path / "base" / "unet" / "diffusion_pytorch_model.safetensors",
                  tmp_path / "tuned" / "unet" / "diffusion_pytorch_model.safetensors",
                  ExtractOptions(rank=2, arch="sd1"))
    assert len(res.adapter.modules) == 2


def test_hf_model_folders_sharded_or_not_give_the_same_lora(tmp_path, gen):
    """An HF model folder (model.safetensors, or shards with model.safetensors.index.json at its root)
    is read like the bare file (issue 17 builds LLM extraction on this)."""
    import json

    shapes = {"model.layers.0.self_attn.q_proj.weight": (64, 48), "model.layers.0.mlp.up_proj.weight": (96, 48),
              "model.layers.1.mlp.down_proj.weight": (48, 96)}
    base = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    base["model.norm.weight"] = torch.ones(48)
    deltas = {k: low_rank(s, 3, gen) for k, s in shapes.items()}
    b, t = pair(tmp_path, base, deltas, dtype=torch.bfloat16)
    for name, src in (("base", b), ("tuned", t)):
        from loratool.io.safetensors import load_file

        tensors = load_file(src)
        single, sharded = tmp_path / f"{name}_hf", tmp_path / f"{name}_hf_sharded"
        single.mkdir()
        sharded.mkdir()
        write_safetensors(single / "model.safetensors", tensors, {"format": "pt"})
        keys = sorted(tensors)
        weight_map = {}
        for i in range(2):
            part = f"model-{i + 1:05d}-of-00002.safetensors"
            write_safetensors(sharded / part, {k: tensors[k] for k in keys[i::2]}, {"format": "pt"})
            weight_map.update({k: part for k in keys[i::2]})
        (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        for folder in (single, sharded):
            (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    opts = ExtractOptions(rank=4, arch="generic")
    ref = extract(b, t, opts)
    for suffix in ("_hf", "_hf_sharded"):
        got = extract(tmp_path / f"base{suffix}", tmp_path / f"tuned{suffix}", opts)
        assert sorted(got.adapter.modules) == sorted(ref.adapter.modules) == [
            "model." + k.removesuffix(".weight") for k in sorted(shapes)]
        for key, m in ref.adapter.modules.items():
            assert torch.equal(got.adapter.modules[key].up, m.up) and torch.equal(got.adapter.modules[key].down, m.down)


def test_a_given_plan_is_used_and_an_adapter_is_not_a_model(tmp_path, gen, monkeypatch):
    import json

    import loratool.ops.extract as ops_extract

    base = {"a.weight": torch.randn(40, 30, generator=gen)}
    b, t = pair(tmp_path, base, {"a.weight": low_rank((40, 30), 2, gen)})
    opts = ExtractOptions(rank=2, arch="generic", dtype="fp32")
    plan = plan_extract(b, t, opts)
    monkeypatch.setattr(ops_extract, "build_plan", lambda *a: pytest.fail("planned twice"))
    res = extract(b, t, opts, plan=plan)
    assert res.plan is plan and list(res.adapter.modules) == ["model.a"]
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(json.dumps({"r": 2}))
    write_safetensors(peft / "adapter_model.safetensors", {"base_model.model.a.lora_A.weight": torch.zeros(2, 30)})
    with pytest.raises(LoraToolError, match="LoRA adapter \\(peft\\), not a model"):
        plan_extract(peft, t, opts)


@pytest.mark.parametrize("gib,expected_mib", [(2, 128), (8, 204.8), (24, 512), (80, 512)])
def test_a_gpu_batch_is_a_fortieth_of_the_card_within_bounds(monkeypatch, gib, expected_mib):
    from types import SimpleNamespace

    from loratool.ops.extract_stream import CPU_BATCH_BYTES, batch_budget

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gib << 30))
    assert batch_budget(torch.device("cuda", 0)) == pytest.approx(expected_mib * 2**20, abs=1)
    assert batch_budget(torch.device("cpu")) == CPU_BATCH_BYTES


@pytest.mark.parametrize("gib,ahead", [(2, 5), (8, 5), (24, 6), (32, 8), (80, 9), (141, 9)])
def test_a_large_card_reads_further_ahead_within_an_eighth_of_its_memory(monkeypatch, gib, ahead):
    from types import SimpleNamespace

    from loratool.ops.extract_stream import batch_budget, read_ahead

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=gib << 30))
    cuda = torch.device("cuda", 0)
    assert read_ahead(cuda, 4) == ahead
    assert ahead == 5 or ahead * batch_budget(cuda) <= (gib << 30) / 8
    assert read_ahead(torch.device("cpu"), 2) == 3


def test_batches_decomposed_on_two_threads_give_the_same_lora_in_the_same_order(tmp_path, gen, monkeypatch):
    """The GPU path decomposes two batches at once (each thread its own stream); here the same scheduling on
    the CPU: results, reports and the order the sink sees are those of one thread."""
    from loratool.ops import extract as extract_mod
    from loratool.ops import extract_stream

    shapes = [(64, 96), (96, 64), (64, 96), (48, 48), (96, 64), (32, 80)]
    base = {f"l{i}.weight": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    deltas = {k: low_rank(v.shape, 5, gen) for k, v in base.items() if k != "l3.weight"}
    b, t = pair(tmp_path, base, deltas)
    opts = ExtractOptions(rank=4, arch="generic")
    monkeypatch.setattr(extract_stream, "CPU_BATCH_BYTES", 2 * 2 * 4 * 64 * 96)  # two modules a batch at most

    def run():
        seen: list[str] = []
        res = extract(b, t, opts, sink=lambda mods: seen.extend(m.key for m in mods))
        return res, seen

    one, one_seen = run()
    monkeypatch.setattr(extract_mod, "compute_workers", lambda device: 2)
    two, two_seen = run()
    assert two_seen == one_seen and len(one_seen) == 5
    assert [(r.key, r.status, r.rank) for r in two.reports] == [(r.key, r.status, r.rank) for r in one.reports]
    for k, m in one.adapter.modules.items():
        assert torch.equal(m.up, two.adapter.modules[k].up) and torch.equal(m.down, two.adapter.modules[k].down)


def test_a_non_finite_weight_met_by_one_of_two_workers_is_named(tmp_path, gen, monkeypatch):
    """With two batches decomposed at once, a NaN in a later batch still stops the run with the tensor and file
    named, raised where that batch's results are taken."""
    from safetensors.torch import load_file, save_file

    from loratool.ops import extract as extract_mod
    from loratool.ops import extract_stream

    base = {f"l{i}.weight": torch.randn(48, 64, generator=gen) for i in range(6)}
    deltas = {k: low_rank(v.shape, 3, gen) for k, v in base.items()}
    b, t = pair(tmp_path, base, deltas)
    bad = load_file(t)
    bad["l4.weight"][3, 5] = float("nan")
    save_file(bad, t)  # another tool's file: ours refuses to write a NaN
    monkeypatch.setattr(extract_stream, "CPU_BATCH_BYTES", 2 * 2 * 4 * 48 * 64)  # two modules a batch
    monkeypatch.setattr(extract_mod, "compute_workers", lambda device: 2)
    seen: list[str] = []
    with pytest.raises(LoraToolError, match=r"l4\.weight.*TUNED") as err:
        extract(b, t, ExtractOptions(rank=3, arch="generic"), sink=lambda mods: seen.extend(m.key for m in mods))
    assert str(t) in str(err.value)
    assert seen == ["model.l0", "model.l1", "model.l2", "model.l3"]  # the batches before it, in order


@pytest.mark.parametrize("failure", ["held", "finite"])
def test_factors_guessed_before_a_batch_is_redone_are_not_kept(tmp_path, gen, monkeypatch, failure):
    """At a fixed rank a batch's factors are formed from the first, unchecked decomposition and read back
    with its spectra; when that decomposition turns out not to hold (a failed check on the device, or a
    non-finite spectrum), the batch is redone and the factors written are formed from the redone one."""
    from loratool.linalg import truncated

    shapes = [(160, 200), (160, 200), (160, 200)]
    base = {f"l{i}.weight": torch.randn(s, generator=gen) for i, s in enumerate(shapes)}
    deltas = {k: low_rank(v.shape, 6, gen) for k, v in base.items()}
    b, t = pair(tmp_path, base, deltas)
    opts = ExtractOptions(rank=8, arch="generic", dtype="fp32")
    good = extract(b, t, opts)
    real = truncated.randomized_svd_deferred

    def spoiled(a, rank, **kw):
        u, s, vh, _ = real(a, rank, **kw)
        if failure == "held":  # as if a check failed on the device: the guess is garbage
            return u.flip(-1), s, vh, torch.zeros((), dtype=torch.bool)
        return u, s * float("nan"), vh, None

    monkeypatch.setattr(truncated, "randomized_svd_deferred", spoiled)
    got = extract(b, t, opts)
    assert [r.status for r in got.reports] == ["ok"] * 3
    assert {r.method for r in got.reports} == {"randomized" if failure == "held" else "exact"}
    for k, d in deltas.items():
        mod = got.adapter.modules["model." + k.removesuffix(".weight")]
        want = (base[k] + d).double() - base[k].double()
        assert float((dense(mod) - want).norm() / want.norm()) < 1e-5
        assert torch.allclose(dense(mod), dense(good.adapter.modules[mod.key]), atol=1e-5)
    assert all(r.rel_error < 1e-5 for r in got.reports)


def test_the_reads_are_advised_in_plan_order_both_models_within_the_budget(tmp_path, gen, monkeypatch):
    """Before a command's extraction the OS is told which bytes it will read: every target weight of both
    models in plan order, stopping before the budget is passed, on a thread of its own."""
    import os

    from loratool.ops.extract_plan import advise_reads, open_pair, read_extents

    base = {f"l{i}.weight": torch.randn(32, 48, generator=gen) for i in range(4)}
    b, t = pair(tmp_path, base, {k: low_rank(v.shape, 2, gen) for k, v in base.items()}, dtype=torch.float16)
    plan = plan_extract(b, t, ExtractOptions(rank=2, arch="generic"))
    per = 32 * 48 * 2
    with open_pair(b, t) as (bs, ts):
        extents = read_extents(bs, ts, plan.modules, budget=1 << 30)
        assert [(os.path.basename(f), n) for f, _, n in extents] == [("base.safetensors", per),
                                                                     ("tuned.safetensors", per)] * 4
        for (f, off, n), m in zip(extents[::2], plan.modules, strict=True):  # the bytes a read of the weight gets
            with open(f, "rb") as fh:
                fh.seek(off)
                assert fh.read(n) == bs.read(m.ref.segments[0].key).numpy().tobytes()
        assert len(read_extents(bs, ts, plan.modules, budget=3 * per + 1)) == 3
    seen = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: seen.append((off, n, advice)), raising=False)
    advise_reads(extents).join()
    assert seen == [(off, n, os.POSIX_FADV_WILLNEED) for _, off, n in extents]


def test_the_command_advises_its_reads_and_a_dry_run_does_not(tmp_path, gen, monkeypatch):
    from click.testing import CliRunner

    from loratool.cli.main import cli
    from loratool.ops import extract_plan

    base = {f"l{i}.weight": torch.randn(32, 48, generator=gen) for i in range(2)}
    b, t = pair(tmp_path, base, {k: low_rank(v.shape, 2, gen) for k, v in base.items()})
    seen = []
    monkeypatch.setattr(extract_plan, "advise_reads", lambda extents: seen.extend(extents))
    res = CliRunner().invoke(cli, ["extract", str(b), str(t), "-r", "2", "--arch", "generic", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert seen == []
    res = CliRunner().invoke(cli, ["extract", str(b), str(t), "-r", "2", "--arch", "generic", "-q",
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert sum(n for *_, n in seen) == 4 * 32 * 48 * 4
