"""Inputs that would hang, paths that would break the one-line error, and ops that used to drop or crash
(issue 14): FIFOs, devices and sockets; newlines and symlink loops in paths; extract of reshaped, fp8 and
NaN weights; merge of a LoRA the checkpoint does not have.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from hostile_inputs import (
    check_refused,
    invoke,
    kohya_tensors,
    model_pair,
    run_process,
    save,
    snapshot,
)
from safetensors.torch import load_file

# -- inputs that are not regular files: refused before they are opened --------------------------


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_a_fifo_is_refused_not_waited_on(command, tmp_path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    out = tmp_path / "out.safetensors"
    args = ["inspect", fifo] if command == "inspect" else ["convert", fifo, "--to", "kohya", "-o", out]
    result = run_process(*args, timeout=60)  # a child: a regression hangs it, not the suite
    line = check_refused(result, inputs=[], outputs=[out], names=[fifo.name])
    assert "FIFO" in line


def test_a_device_or_a_socket_is_refused(tmp_path) -> None:
    zero = tmp_path / "zero.safetensors"
    zero.symlink_to("/dev/zero")
    sock_path = tmp_path / "s.safetensors"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(sock_path))
        for path, kind in ((zero, "character device"), (sock_path, "socket")):
            for args in (["inspect", path], ["scale", path, "2", "-o", tmp_path / "o.safetensors"]):
                line = check_refused(invoke(*args), inputs=[], outputs=[tmp_path / "o.safetensors"], names=[path.name])
                assert kind in line, line
    finally:
        sock.close()


# -- paths that would break the one line ---------------------------------------------------------


def test_a_newline_in_a_path_stays_on_one_line(tmp_path) -> None:
    bad = tmp_path / "two\nlines.safetensors"
    bad.write_bytes(b"\0" * 3)
    line = check_refused(invoke("inspect", bad), inputs=[bad])
    assert "two\\nlines.safetensors" in line


def test_an_output_through_a_symlink_loop_is_one_line(tmp_path) -> None:
    src = save(tmp_path / "in.safetensors", kohya_tensors())
    loop = tmp_path / "loop.safetensors"  # named as the layout writes it (-o gains no extension)
    loop.symlink_to(loop)
    before = snapshot([src])
    for out in (loop, loop / "out.safetensors"):
        check_refused(invoke("convert", src, "--to", "kohya", "-o", out), inputs=[src], before=before,
                      names=["loop.safetensors"])


# -- extract -------------------------------------------------------------------------------------


def test_extract_refuses_a_layer_reshaped_in_tuned_naming_it(tmp_path) -> None:
    def flatten(t):
        t["b.weight"] = t["b.weight"].reshape(-1).contiguous()
        return t
    base, tuned = model_pair(tmp_path, change=flatten)
    out = tmp_path / "out"  # a generic pair writes a peft folder
    line = check_refused(invoke("extract", base, tuned, "--arch", "generic", "-r", "2", "-o", out),
                         inputs=[base, tuned], outputs=[out], before=snapshot([base, tuned]))
    assert "b.weight" in line and "[16, 8]" in line and "[128]" in line


@pytest.mark.parametrize("side", ["base", "tuned"])
def test_extract_names_a_nan_tensor_and_its_file(side, tmp_path) -> None:
    def poison(t):
        t["a.weight"][2, 3] = float("nan")
        return t
    base, tuned = model_pair(tmp_path, change=poison if side == "tuned" else None)
    if side == "base":
        save(base, poison(load_file(base)))
    out = tmp_path / "out"  # a generic pair writes a peft folder
    line = check_refused(invoke("extract", base, tuned, "--arch", "generic", "-r", "2", "-o", out),
                         inputs=[base, tuned], outputs=[out], before=snapshot([base, tuned]))
    named = base if side == "base" else tuned
    assert line.startswith(f"loratool: error: {named}: tensor a.weight") and side.upper() in line, line


def test_extract_reads_fp8_layers(tmp_path) -> None:
    """fp8 weights (e4m3 in TUNED, e5m2 in BASE) are widened, exactly, and extracted."""
    base, tuned = model_pair(tmp_path)
    save(tuned, {k: v.to(torch.float8_e4m3fn) for k, v in load_file(tuned).items()})
    save(base, {k: v.to(torch.float8_e5m2) for k, v in load_file(base).items()})
    out = tmp_path / "out"  # a generic pair writes a peft folder
    result = invoke("extract", base, tuned, "--arch", "generic", "-r", "2", "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert "internal error" not in result.stderr and out.exists()


# -- merge -----------------------------------------------------------------------------------------

_LDM = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0."


def _checkpoint(folder: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    return save(folder / "ckpt.safetensors", {
        _LDM + "attn1.to_q.weight": torch.randn(320, 320, generator=g).half(),
        _LDM + "attn2.to_k.weight": torch.randn(320, 768, generator=g).half(),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight":
            torch.randn(3072, 768, generator=g).half()})


def _lora_the_checkpoint_lacks(folder: Path, n_blocks: int = 3) -> Path:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for b in range(1, n_blocks + 1):
        for a in range(2):
            for proj in ("to_q", "to_k", "to_v", "to_out_0"):
                name = f"lora_unet_up_blocks_{b}_attentions_{a}_transformer_blocks_0_attn1_{proj}"
                tensors[f"{name}.lora_down.weight"] = torch.randn(4, 640, generator=g) * 0.1
                tensors[f"{name}.lora_up.weight"] = torch.randn(640, 4, generator=g) * 0.1
                tensors[f"{name}.alpha"] = torch.tensor(4.0)
    return save(folder / "lora.safetensors", tensors)


@pytest.mark.parametrize("allow", [False, True])
def test_merge_of_modules_the_checkpoint_lacks_is_short_and_never_exit_0(allow, tmp_path) -> None:
    ckpt, lora = _checkpoint(tmp_path), _lora_the_checkpoint_lacks(tmp_path)
    out = tmp_path / "baked.safetensors"
    args = ["merge", ckpt, lora, "--arch", "sd1", "-o", out] + (["--allow-unmatched"] if allow else [])
    line = check_refused(invoke(*args), inputs=[ckpt, lora], outputs=[out], before=snapshot([ckpt, lora]))
    assert len(line) < 400 and "24" in line and "and 22 more" in line, line
