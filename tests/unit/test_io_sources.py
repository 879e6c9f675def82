"""Tensor sources: every kind of input opened lazily through one interface."""

from __future__ import annotations

import json
import os

import pytest
import torch

from loratool.errors import LoraToolError, UnsupportedInput
from loratool.io.sources import MissingKey, open_source
from loratool.io.writer import write_safetensors


def _t(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _component(folder, tensors, *, name="diffusion_pytorch_model", config=True, shards=0) -> None:
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text(json.dumps({"_class_name": "X"}))
    if not shards:
        write_safetensors(folder / f"{name}.safetensors", tensors)
        return
    keys = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        fname = f"{name}-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, {k: tensors[k] for k in part})
        weight_map.update({k: fname for k in part})
    (folder / f"{name}.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


UNET = {"conv_in.weight": _t(4, 4, 3, 3), "down_blocks.0.attentions.0.proj_in.weight": _t(8, 4, seed=1),
        "mid_block.resnets.0.norm1.bias": _t(8, seed=2)}
TE = {"text_model.encoder.layers.0.self_attn.q_proj.weight": _t(6, 6, seed=3)}
TE2 = {"text_model.encoder.layers.0.mlp.fc1.weight": _t(12, 6, seed=4),
       "text_model.final_layer_norm.weight": _t(6, seed=5), "text_projection.weight": _t(6, 6, seed=6)}


def test_single_safetensors_file(tmp_path) -> None:
    p = write_safetensors(tmp_path / "a.safetensors", {"x": _t(2, 3), "y": _t(4).half()}, {"k": "v"})
    with open_source(p) as s:
        assert s.kind == "safetensors" and s.path == str(p)
        assert s.keys() == ["x", "y"] and s.shape("y") == (4,) and s.dtype("y") == torch.float16
        assert torch.equal(s.get("x"), _t(2, 3)) and s.metadata == {"k": "v"} and s.config is None
        assert "x" in s and len(s) == 2
        with pytest.raises(KeyError) as e:
            s.get("z")
        assert isinstance(e.value, LoraToolError)


def test_pickle_file_and_legacy_list(tmp_path) -> None:
    torch.save({"state_dict": {"w": _t(3)}, "global_step": 5}, tmp_path / "m.ckpt")
    with open_source(tmp_path / "m.ckpt") as s:
        assert s.kind == "pickle" and s.layout == "state_dict" and s.keys() == ["w"]
        assert s.ignored == ["global_step"] and s.shape("w") == (3,) and torch.equal(s.get("w"), _t(3))
    torch.save([_t(4, 1), _t(1, 4, seed=1)], tmp_path / "lora.pt")
    with open_source(tmp_path / "lora.pt") as s:
        assert s.layout == "tensor_list" and s.keys() == ["0", "1"]
        assert [tuple(t.shape) for t in s.as_list()] == [(4, 1), (1, 4)]
    # a pickle with an unexpected suffix is still recognised by its magic and read weights-only,
    # and a safetensors file whose header length starts with byte 0x80 is not taken for a pickle
    torch.save({"w": _t(2)}, tmp_path / "weights.data")
    assert open_source(tmp_path / "weights.data").kind == "pickle"
    st = write_safetensors(tmp_path / "x.data", {"a" * 72: _t(2)})
    assert st.read_bytes()[:2] == b"\x80\x00"
    assert open_source(st).kind == "safetensors"
    renamed = tmp_path / "renamed.bin"  # a safetensors file saved under a pickle name
    renamed.write_bytes(st.read_bytes())
    assert open_source(renamed).kind == "safetensors"
    with pytest.raises(MissingKey):
        open_source(tmp_path / "m.ckpt").get("nope")


def test_peft_folder_safetensors_and_bin(tmp_path) -> None:
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_v"]}
    a = tmp_path / "peft_st"
    a.mkdir()
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    write_safetensors(a / "adapter_model.safetensors",
                      {"base_model.model.to_q.lora_A.weight": _t(4, 8)}, {"format": "pt"})
    with open_source(a) as s:
        assert s.kind == "peft" and s.config == cfg and s.metadata == {"format": "pt"}
        assert s.keys() == ["base_model.model.to_q.lora_A.weight"]
    b = tmp_path / "peft_bin"
    b.mkdir()
    (b / "adapter_config.json").write_text(json.dumps(cfg))
    torch.save({"base_model.model.to_v.lora_B.weight": _t(8, 4)}, b / "adapter_model.bin")
    with open_source(b) as s:
        assert s.kind == "peft" and s.config["r"] == 4 and s.shape("base_model.model.to_v.lora_B.weight") == (8, 4)


@pytest.mark.parametrize("content, match", [("{not json", "adapter_config.json is not valid JSON"),
                                            ("[1]", "adapter_config.json is not a JSON object")])
def test_peft_folder_bad_config(tmp_path, content, match) -> None:
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(LoraToolError, match=match):
        open_source(tmp_path)


def test_peft_folder_without_weights(tmp_path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(LoraToolError, match="without adapter_model.safetensors") as e:
        open_source(tmp_path)
    assert str(tmp_path) in str(e.value)


def _pipeline(root, *, shards=0):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "vae": ["diffusers", "AutoencoderKL"], "force_zeros_for_empty_prompt": True}))
    _component(root / "unet", UNET, shards=shards)
    _component(root / "text_encoder", TE, name="model")
    _component(root / "text_encoder_2", TE2, name="model", shards=2)
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text("{}")
    (root / "scheduler").mkdir()
    (root / "vae").mkdir()  # listed but holding no weights: not a component here


@pytest.mark.parametrize("shards", [0, 2])
def test_diffusers_pipeline_folder(tmp_path, shards) -> None:
    root = tmp_path / "pipe"
    _pipeline(root, shards=shards)
    with open_source(root) as s:
        assert s.kind == "diffusers" and s.config["_class_name"] == "StableDiffusionXLPipeline"
        assert list(s.components) == ["unet", "text_encoder", "text_encoder_2"]
        assert sorted(s.components["unet"]) == sorted(UNET)
        assert sorted(s.components["text_encoder_2"]) == sorted(TE2)
        assert len(s) == len(UNET) + len(TE) + len(TE2)
        for comp, ref in (("unet", UNET), ("text_encoder", TE), ("text_encoder_2", TE2)):
            for k, v in ref.items():
                key = f"{comp}.{k}"
                assert s.shape(key) == tuple(v.shape) and s.dtype(key) == v.dtype
                assert torch.equal(s.get(key), v)
        unet = s.component("unet")
        assert unet.kind == "component" and torch.equal(unet.get("conv_in.weight"), UNET["conv_in.weight"])
        with pytest.raises(LoraToolError, match="no component 'transformer'"):
            s.component("transformer")
        with pytest.raises(KeyError):
            s.get("unet.nope")


def test_component_folder_single_sharded_and_variant(tmp_path) -> None:
    _component(tmp_path / "unet", UNET)
    with open_source(tmp_path / "unet") as s:
        assert s.kind == "component" and s.config == {"_class_name": "X"} and sorted(s.keys()) == sorted(UNET)
        assert s.components == {"unet": s.keys()}
    _component(tmp_path / "te2", TE2, name="model", shards=3, config=False)
    with open_source(tmp_path / "te2") as s:
        assert sorted(s.keys()) == sorted(TE2) and s.config is None
        assert torch.equal(s.get("text_projection.weight"), TE2["text_projection.weight"])
    only_fp16 = tmp_path / "fp16"
    only_fp16.mkdir()
    write_safetensors(only_fp16 / "diffusion_pytorch_model.fp16.safetensors", {"w": _t(2).half()})
    with open_source(only_fp16) as s:
        assert s.dtype("w") == torch.float16
    write_safetensors(only_fp16 / "diffusion_pytorch_model.bf16.safetensors", {"w": _t(2).bfloat16()})
    with pytest.raises(LoraToolError, match="several variants \\(bf16, fp16\\)"):
        open_source(only_fp16)
    with open_source(only_fp16, variant="bf16") as s:
        assert s.dtype("w") == torch.bfloat16


def test_component_with_bin_weights(tmp_path) -> None:
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    torch.save(TE, folder / "pytorch_model.bin")
    with open_source(folder) as s:
        assert s.kind == "component" and s.keys() == list(TE)


def test_diffusers_lora_folder(tmp_path) -> None:
    write_safetensors(tmp_path / "pytorch_lora_weights.safetensors", {"unet.a.lora.down.weight": _t(1, 2)})
    with open_source(tmp_path) as s:
        assert s.kind == "safetensors" and s.keys() == ["unet.a.lora.down.weight"]


def test_broken_shard_index(tmp_path) -> None:
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(LoraToolError, match="names 'gone.safetensors', which is not a file"):
        open_source(folder)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x"}}))
    with pytest.raises(LoraToolError, match="not a file beside it"):
        open_source(folder)
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(LoraToolError, match="no weight_map"):
        open_source(folder)


def test_missing_empty_and_unrecognised(tmp_path) -> None:
    with pytest.raises(LoraToolError, match="no such file or folder") as e:
        open_source(tmp_path / "nope")
    assert str(e.value).startswith(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoraToolError, match="the folder is empty"):
        open_source(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hi")
    with pytest.raises(LoraToolError, match="nothing loratool can read in this folder") as e:
        open_source(junk)
    assert "\n" not in str(e.value) and str(junk) in str(e.value)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(LoraToolError, match="without any component weights"):
        open_source(pipe)


def test_malicious_pickle_in_a_folder_is_refused(tmp_path) -> None:
    import builtins

    class Evil:
        def __reduce__(self):
            return (builtins.exec, ("raise SystemExit(3)",))

    (tmp_path / "adapter_config.json").write_text("{}")
    torch.save({"x": Evil()}, tmp_path / "adapter_model.bin")
    with pytest.raises(UnsupportedInput):
        open_source(tmp_path)


def test_folder_of_peft_component_folders(tmp_path) -> None:
    for comp, r in (("unet", 4), ("text_encoder", 2)):
        sub = tmp_path / comp
        sub.mkdir()
        (sub / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
        write_safetensors(sub / "adapter_model.safetensors", {"base_model.model.q.lora_A.weight": _t(r, 8)})
    with open_source(tmp_path) as s:
        assert s.kind == "peft" and list(s.components) == ["text_encoder", "unet"]
        assert s.config == {"text_encoder": {"r": 2, "peft_type": "LORA"}, "unet": {"r": 4, "peft_type": "LORA"}}
        assert s.keys() == ["text_encoder.base_model.model.q.lora_A.weight", "unet.base_model.model.q.lora_A.weight"]
        assert s.shape("unet.base_model.model.q.lora_A.weight") == (4, 8)
        assert torch.equal(s.get("text_encoder.base_model.model.q.lora_A.weight"), _t(2, 8))


def test_folders_written_by_diffusers_and_transformers(tmp_path) -> None:
    """Folders as the real libraries lay them out (shard index, fp16 variant), read back tensor for tensor."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=8, attention_head_dim=4)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
    root = tmp_path / "pipe"
    unet.save_pretrained(root / "unet", safe_serialization=True, max_shard_size="100KB")
    te.save_pretrained(root / "text_encoder", safe_serialization=True)
    saved = {"unet": {k: v.clone() for k, v in unet.state_dict().items()}, "text_encoder": te.state_dict()}
    unet.half().save_pretrained(tmp_path / "unet16", safe_serialization=True, variant="fp16")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    assert len(list((root / "unet").glob("*.safetensors"))) > 1  # really sharded
    with open_source(root) as s:
        assert s.kind == "diffusers" and set(s.components) == {"unet", "text_encoder"}
        for prefix, sd in saved.items():
            assert sorted(s.components[prefix]) == sorted(sd)
            for k, v in sd.items():
                assert torch.equal(s.get(f"{prefix}.{k}"), v), k
    with open_source(tmp_path / "unet16") as s:
        assert {s.dtype(k) for k in s.keys()} == {torch.float16}


def test_sources_release_their_files(tmp_path) -> None:
    import gc
    import os

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to count handles")
    root = tmp_path / "pipe"
    _pipeline(root, shards=3)
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with open_source(root) as s:
            for k in s.keys():
                s.get(k).sum()
        s = open_source(root)  # dropped without close: collected
        s.get("text_encoder_2.text_projection.weight")
        del s
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before


LLM = {"model.embed_tokens.weight": _t(32, 8), "model.layers.0.self_attn.q_proj.weight": _t(8, 8, seed=1),
       "model.layers.0.mlp.up_proj.weight": _t(16, 8, seed=2), "model.norm.weight": _t(8, seed=3)}


@pytest.mark.parametrize("shards", [0, 2])
def test_hf_model_folder_single_or_sharded(tmp_path, shards) -> None:
    """An HF model folder (model.safetensors or its shard index at the root, config.json beside it)."""
    folder = tmp_path / "qwen"
    _component(folder, LLM, name="model", config=False, shards=shards)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    with open_source(folder) as s:
        assert s.kind == "component" and s.config["model_type"] == "qwen2"
        assert sorted(s.keys()) == sorted(LLM) and s.shapes() == {k: tuple(v.shape) for k, v in LLM.items()}
        for k, v in LLM.items():
            assert torch.equal(s.get(k), v)
        file, inner = s.location("model.layers.0.mlp.up_proj.weight")
        assert inner == "model.layers.0.mlp.up_proj.weight" and file.startswith(str(folder))
        assert file.endswith("model.safetensors" if not shards else "-of-00002.safetensors")


def test_pipeline_folder_without_model_index(tmp_path) -> None:
    _component(tmp_path / "unet", UNET)
    _component(tmp_path / "text_encoder", TE, name="model")
    with open_source(tmp_path) as s:
        assert s.kind == "diffusers" and s.config is None and list(s.components) == ["text_encoder", "unet"]
        assert torch.equal(s.get("unet.conv_in.weight"), UNET["conv_in.weight"])


def test_row_reads_and_locations_alike_for_every_source(tmp_path) -> None:
    """read(key, rows, out) gives the same rows from a file, a folder and a pickle, into the buffer."""
    w = _t(12, 4, seed=9)
    write_safetensors(tmp_path / "w.safetensors", {"w": w})
    _component(tmp_path / "unet", {"w": w})
    torch.save({"w": w}, tmp_path / "w.pt")
    for path in (tmp_path / "w.safetensors", tmp_path / "unet", tmp_path / "w.pt"):
        with open_source(path) as s:
            buf = torch.zeros(1024, dtype=torch.uint8)
            got = s.read("w", (3, 7), out=buf)
            assert torch.equal(got, w[3:7]) and got.data_ptr() == buf.data_ptr(), path
            assert torch.equal(s.read("w", (0, 2)), w[:2]) and s.nbytes("w", (3, 7)) == 64
            assert s.dtype_name("w") == "F32" and s.info("w").shape == (12, 4)
            assert os.path.basename(s.location("w")[0]).startswith(("w.", "diffusion_pytorch_model"))
            with pytest.raises(LoraToolError, match="rows 5:20"):
                s.nbytes("w", (5, 20))
            with pytest.raises(KeyError):
                s.location("nope")


def test_reads_from_threads_share_one_source(tmp_path) -> None:
    """Positional reads: many threads reading one sharded folder at once get the right bytes."""
    from concurrent.futures import ThreadPoolExecutor

    big = {f"t{i}": _t(64, 33, seed=i) for i in range(24)}
    _component(tmp_path / "m", big, name="model", shards=3)
    with open_source(tmp_path / "m") as s, ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(lambda k: (k, s.get(k)), list(big) * 4))
    assert all(torch.equal(got[k], v) for k, v in big.items())
