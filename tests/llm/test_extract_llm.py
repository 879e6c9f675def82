"""LLM folders as users have them: tiny Qwen2/Llama models made here with transformers, fine-tuned by a
known low-rank ΔW, extracted with ``loratool extract --to peft``, loaded by peft (PeftModel and
AutoPeftModelForCausalLM), and compared with the tuned model itself (base + ΔW)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from loratool.cli.main import cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CHANGED = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
           "model.layers.1.self_attn.o_proj.weight")
RANK = 3  # of every ΔW made here; extraction at -r 4 reproduces it exactly


def tiny(kind: str, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tied, max_position_embeddings=64)
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


def fine_tune(model, keys, seed: int = 1) -> None:
    """W += a rank-3 ΔW on each weight in ``keys`` (the embedding, and a tied head with it, included)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in keys:
            w = params[key]
            a = torch.randn(w.shape[0], RANK, generator=gen)
            b = torch.randn(RANK, w.shape[1], generator=gen)
            w += 0.05 * (a @ b) / RANK


def save(model, folder, dtype=torch.float32, shard: str | None = None) -> None:
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    model.float()


def pair(tmp_path, kind="qwen2", tied=True, keys=CHANGED, dtype=torch.float32, shard=None):
    base = tiny(kind, tied)
    save(base, tmp_path / "base", dtype, shard)
    tuned = tiny(kind, tied)
    fine_tune(tuned, keys)
    save(tuned, tmp_path / "tuned", dtype, shard)
    return tmp_path / "base", tmp_path / "tuned", tuned


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[1, 5, 17, 42, 77, 95, 3, 60]])


def load_peft(base_folder, adapter):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, adapter).eval()
    return model, [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_peft_and_autopeft_load_and_reproduce_the_tuned_model(tmp_path, kind):
    emb = "model.embed_tokens.weight"
    b, t, tuned = pair(tmp_path, kind, tied=False, keys=(*CHANGED, emb, "lm_head.weight"))
    res = run("extract", b, t, "-r", 4, "--to", "peft", "-o", tmp_path / "out", "--report", tmp_path / "r.json",
              "-q", "--device", "cpu")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(b.resolve())
    assert "ensure_weight_tying" not in config
    from loratool.io.safetensors import SafetensorsFile

    with SafetensorsFile(tmp_path / "out" / "adapter_model.safetensors") as f:
        keys = set(f.keys())
        assert f.shape("base_model.model.model.embed_tokens.lora_embedding_A") == (4, 96)  # [r, vocab]
        assert f.shape("base_model.model.model.embed_tokens.lora_embedding_B") == (32, 4)  # [dim, r]
    assert "base_model.model.lm_head.lora_A.weight" in keys and not any("embed_tokens.lora_A" in k for k in keys)
    model, caught = load_peft(b, tmp_path / "out")
    assert not [w for w in caught if "missing" in w.lower() or "unexpected" in w.lower()], caught
    want = logits(tuned, IDS)
    torch.testing.assert_close(logits(model, IDS), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(model.merge_and_unload(), IDS), want, atol=1e-4, rtol=1e-4)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(auto, IDS), want, atol=1e-4, rtol=1e-4)
    report = json.loads((tmp_path / "r.json").read_text())
    names = {m["key"] for m in report["modules"]}
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" in names and "model.embed_tokens" in names
    assert not any(n.startswith("model.model.") for n in names)
    assert res.output == ""


def test_tied_embedding_is_extracted_once_and_the_merge_moves_the_head_too(tmp_path):
    """Qwen2 with tie_word_embeddings: the file has no lm_head; a changed embedding changes the head as
    well. The embedding's LoRA is merged into the shared weight once: the merged model is the tuned one.
    Unmerged, peft adapts the lookup only (its limitation, see ops/extract_llm.py)."""
    b, t, tuned = pair(tmp_path, "qwen2", tied=True, keys=(*CHANGED, "model.embed_tokens.weight"))
    run("extract", b, t, "-r", 4, "--to", "peft", "-o", tmp_path / "out", "-q", "--device", "cpu")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in config["target_modules"] and "lm_head" not in config["target_modules"]
    model, _ = load_peft(b, tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(model.get_input_embeddings()(IDS), tuned.get_input_embeddings()(IDS))
    merged = model.merge_and_unload()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(logits(merged, IDS), logits(tuned, IDS), atol=1e-4, rtol=1e-4)


def test_a_stored_tied_head_is_left_out_and_said_so(tmp_path):
    """Some files store the tied head anyway: it is the embedding, so it is not extracted twice."""
    from loratool.io.safetensors import load_file
    from loratool.io.writer import write_safetensors
    from loratool.ops.extract import extract
    from loratool.ops.extract_plan import ExtractOptions

    b, t, _ = pair(tmp_path, "qwen2", tied=True, keys=(*CHANGED, "model.embed_tokens.weight"))
    for folder in (b, t):
        tensors = load_file(folder / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        write_safetensors(folder / "model.safetensors", tensors, {"format": "pt"}, force=True)
    res = extract(b, t, ExtractOptions(rank=4, arch="generic"))
    assert res.summary["tied_to_embedding"] == {"lm_head": "model.embed_tokens"}
    assert "model.lm_head" not in res.adapter.modules and "model.model.embed_tokens" in res.adapter.modules


def test_sharded_bf16_folders_and_an_unchanged_embedding_read_once(tmp_path, monkeypatch):
    """A sharded bf16 folder pair (model.safetensors.index.json) whose embedding did not change: the
    embedding is reported unchanged, and each side of it is read exactly once."""
    from loratool.io.safetensors import SafetensorsFile

    b, t, tuned = pair(tmp_path, "llama", tied=False, dtype=torch.bfloat16, shard="20KB")
    assert (b / "model.safetensors.index.json").is_file()
    reads: list[str] = []
    real = SafetensorsFile.read

    def counting(self, key, rows=None, out=None):
        reads.append(key)
        return real(self, key, rows, out)

    monkeypatch.setattr(SafetensorsFile, "read", counting)
    run("extract", b, t, "-r", 4, "--to", "peft", "-o", tmp_path / "out", "--report", tmp_path / "r.json", "-q",
        "--device", "cpu")
    assert reads.count("model.embed_tokens.weight") == 2  # base once, tuned once
    report = json.loads((tmp_path / "r.json").read_text())
    assert "model.embed_tokens" in report["summary"]["skipped_unchanged"]
    assert sorted(m["key"] for m in report["modules"] if m["status"] == "ok") == sorted(
        k.removesuffix(".weight") for k in CHANGED)
    model, _ = load_peft(b, tmp_path / "out")
    base_bf16 = transformers.AutoModelForCausalLM.from_pretrained(t, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(model, IDS), logits(base_bf16, IDS), atol=2e-2, rtol=2e-2)


def test_flags_set_the_peft_fields(tmp_path):
    b, t, _ = pair(tmp_path, "qwen2", tied=True)
    run("extract", b, t, "-r", 2, "--to", "peft", "-o", tmp_path / "out", "-q", "--device", "cpu",
        "--task-type", "SEQ_CLS", "--base-model-name", "someone/tiny-qwen")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == "someone/tiny-qwen"
