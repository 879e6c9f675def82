"""Every command against broken adapters: one line, exit 1, nothing written, inputs untouched (issue 14).

Two kinds of breakage:

* a *module* that cannot make a ΔW (alpha that is not one finite number, rank 0, factors that do not chain,
  NaN weights): ``inspect`` reports the keys as unknown, with the reason; every command that would use or
  write the module refuses, naming it — never drops it silently;
* a *file* that cannot be read at all (a lone surrogate in a name, a nested JSON bomb, a non-finite config
  number, a self-referencing or exploding pickle): every command refuses in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hostile_inputs import (
    CONV,
    Q,
    check_refused,
    invoke,
    kohya_tensors,
    peft_folder,
    raw_header,
    rewrite_header,
    save,
    snapshot,
)

MODULE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _with(change):
    def make(folder: Path) -> Path:
        tensors = kohya_tensors(seed=1)
        change(tensors)
        return save(folder / "broken.safetensors", tensors)
    return make


def _set(key: str, value: torch.Tensor):
    return _with(lambda t: t.__setitem__(key, value))


BROKEN_MODULES = {  # name -> (make, what the error must say)
    "alpha of shape [2]": (_set(f"{Q}.alpha", torch.tensor([1.0, 2.0])), "alpha of shape [2]"),
    "alpha of shape [0]": (_set(f"{Q}.alpha", torch.zeros(0)), "alpha of shape [0]"),
    "NaN alpha": (_set(f"{Q}.alpha", torch.tensor(float("nan"))), "alpha is nan"),
    "infinite alpha": (_set(f"{Q}.alpha", torch.tensor(float("inf"))), "alpha is inf"),
    "rank-0 factors": (_with(lambda t: t.update({f"{Q}.lora_down.weight": torch.zeros(0, 320),
                                                 f"{Q}.lora_up.weight": torch.zeros(320, 0)})), "rank 0"),
    "down and up ranks differ": (_set(f"{Q}.lora_up.weight", torch.randn(320, 3)), "disagree on the rank"),
    "1x1 down with 3x3 up": (_with(lambda t: t.update({f"{CONV}.lora_down.weight": torch.randn(4, 320, 1, 1),
                                                       f"{CONV}.lora_up.weight": torch.randn(320, 4, 3, 3)})),
                             "up is 1x1"),
}


def _commands(src: Path, other: Path, out: Path) -> dict[str, list]:
    return {
        "convert": ["convert", src, "--to", "diffusers", "-o", out],
        "scale": ["scale", src, "0.5", "-o", out],
        "resize": ["resize", src, "-r", "2", "-o", out],
        "mix concat": ["mix", src, other, "-o", out],
        "mix svd": ["mix", src, other, "--mode", "svd", "-r", "4", "-o", out],
        "merge": ["merge", other, src, "-o", out],
    }


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save(tmp_path_factory.mktemp("good") / "good.safetensors", kohya_tensors(seed=2))


@pytest.mark.parametrize("case", sorted(BROKEN_MODULES))
def test_a_broken_module_is_named_never_dropped(case, tmp_path, good) -> None:
    make, says = BROKEN_MODULES[case]
    src = make(tmp_path)
    before = snapshot([src, good])
    report = invoke("inspect", "--json", src)  # inspect shows the file, with the keys it cannot use and why
    assert report.exit_code == 0, report.stderr
    (info,) = json.loads(report.stdout)
    assert info["unknown_keys"], info
    for name, args in _commands(src, good, tmp_path / "out.safetensors").items():
        line = check_refused(invoke(*args), inputs=[src, good], outputs=[tmp_path / "out.safetensors"], before=before)
        assert (says in line or name == "merge") and "broken.safetensors" in line, (name, line)


NON_FINITE = {  # command -> (factor, value, what the line says): the SVD ops refuse before LAPACK, the
    # others at the write (NaN passed through unchanged; scale changes alpha, not the factor)
    "resize": ("lora_down", float("nan"), "NaN or infinite"),
    "mix svd": ("lora_down", float("nan"), "NaN or infinite"),
    "convert": ("lora_up", float("inf"), "infinite"),
    "scale": ("lora_up", float("inf"), "infinite"),
}


@pytest.mark.parametrize("command", sorted(NON_FINITE))
def test_non_finite_weights_never_reach_the_svd_nor_an_output(command, tmp_path, good) -> None:
    factor, value, says = NON_FINITE[command]
    tensors = kohya_tensors(seed=3)
    tensors[f"{Q}.{factor}.weight"][1, 1] = value
    src = save(tmp_path / "nan.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    line = check_refused(invoke(*_commands(src, good, out)[command]), inputs=[src, good], outputs=[out])
    assert "to_q" in line and says in line, line
    if command == "resize":  # one input: the file is named too
        assert src.name in line, line


def test_scaling_out_of_range_is_refused_naming_the_module(tmp_path, good) -> None:
    out = tmp_path / "big.safetensors"
    line = check_refused(invoke("scale", good, "1e308", "-o", out), inputs=[good], outputs=[out])
    assert "makes alpha inf" in line and "unet." in line
    lbw = ",".join(["1"] + ["nan"] * 16)  # BASE (the text encoder) 1, every UNet block NaN
    line = check_refused(invoke("scale", good, "1", "--lbw", lbw, "--arch", "sd1", "-o", out), inputs=[good],
                         outputs=[out])
    assert "not a finite number" in line


# -- files that cannot be read at all --------------------------------------------------------------


def _surrogate_name(folder: Path) -> Path:
    src = save(folder / "ok.safetensors", kohya_tensors())
    return rewrite_header(src, folder / "bad.safetensors",
                          lambda h: {k.replace("to_q", "to_\udc80q"): v for k, v in h.items()})


def _surrogate_metadata(folder: Path) -> Path:
    src = save(folder / "ok.safetensors", kohya_tensors(), {"ss_output_name": "x"})
    return rewrite_header(src, folder / "bad.safetensors",
                          lambda h: {**h, "__metadata__": {"ss_output_name": "\ud800x"}})


def _header_bomb(folder: Path) -> Path:
    raw = b"[" * 100_000 + b"]" * 100_000
    (folder / "bad.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    return folder / "bad.safetensors"


def _metadata_bomb(folder: Path) -> Path:
    return save(folder / "bad.safetensors", kohya_tensors(), {"lora_adapter_metadata": "[" * 50_000 + "]" * 50_000})


def _metadata_huge_number(folder: Path) -> Path:
    return save(folder / "bad.safetensors", kohya_tensors(), {"lora_adapter_metadata": '{"unet.lora_alpha": 1e400}'})


def _peft_huge_rank(folder: Path) -> Path:
    return peft_folder(folder / "bad", '{"peft_type": "LORA", "r": 1e400, "lora_alpha": 8}')


def _peft_config_bomb(folder: Path) -> Path:
    return peft_folder(folder / "bad", "{\"r\": 4, \"x\": " + "[" * 50_000 + "]" * 50_000 + "}")


def _peft_bad_pattern(folder: Path) -> Path:
    return peft_folder(folder / "bad", {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "alpha_pattern": {"(?=x)": 2}})


def _pickle_bomb(folder: Path) -> Path:
    d: dict = {"w": torch.zeros(1)}
    for _ in range(40):  # 2 KB on disk, 2^40 names once flattened
        d = {"a": d, "b": d}
    torch.save(d, folder / "bad.pt")
    return folder / "bad.pt"


def _pickle_wide_bomb(folder: Path) -> Path:
    d: dict = {f"k{i}": torch.zeros(1) for i in range(4)}
    for _ in range(12):  # shallow enough for the depth bound: the name count stops it
        d = {f"k{i}": d for i in range(4)}
    torch.save(d, folder / "bad.pt")
    return folder / "bad.pt"


def _pickle_self(folder: Path) -> Path:
    d: dict = {"t": torch.zeros(2)}
    d["me"] = d
    torch.save(d, folder / "bad.pt")
    return folder / "bad.pt"


def _truncated(folder: Path) -> Path:
    blob = save(folder / "ok.safetensors", kohya_tensors()).read_bytes()
    (folder / "bad.safetensors").write_bytes(blob[: len(blob) - 100])
    return folder / "bad.safetensors"


def _nan_in_header(folder: Path) -> Path:
    (folder / "bad.safetensors").write_bytes(raw_header({"a": {"dtype": "F32", "shape": [float("nan")],
                                                               "data_offsets": [0, 4]}}, b"\0" * 4))
    return folder / "bad.safetensors"


BROKEN_FILES = {  # name -> (make, what the error must say)
    "lone surrogate in a tensor name": (_surrogate_name, "lone UTF-16 surrogate"),
    "lone surrogate in metadata": (_surrogate_metadata, "lone UTF-16 surrogate"),
    "JSON nesting bomb as header": (_header_bomb, "not valid JSON"),
    "JSON nesting bomb in metadata": (_metadata_bomb, "nested more than"),
    "1e400 in adapter metadata": (_metadata_huge_number, "out of range (1e400)"),
    "r: 1e400 in adapter_config.json": (_peft_huge_rank, "out of range (1e400)"),
    "JSON nesting bomb in adapter_config.json": (_peft_config_bomb, "nested more than"),
    "look-around in alpha_pattern": (_peft_bad_pattern, "not a pattern loratool evaluates"),
    "pickle of shared nested dicts (deep)": (_pickle_bomb, "levels deep"),
    "pickle of shared nested dicts (wide)": (_pickle_wide_bomb, "entries"),
    "pickle of a dict inside itself": (_pickle_self, "contains itself"),
    "truncated file": (_truncated, "truncated"),
    "NaN in a header shape": (_nan_in_header, "non-finite number (NaN)"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_file_is_refused_by_every_command(case, tmp_path, good) -> None:
    make, says = BROKEN_FILES[case]
    src = make(tmp_path)
    before = snapshot([src, good])
    out = tmp_path / "out.safetensors"
    commands = {"inspect": ["inspect", src], "ratio": ["ratio", src], **_commands(src, good, out)}
    for name, args in commands.items():
        line = check_refused(invoke(*args), inputs=[src, good], outputs=[out], before=before)
        assert says in line and src.name in line, (name, line)


def test_a_redos_pattern_returns_promptly(tmp_path) -> None:
    """peft's alpha_pattern ``([a-z_.0-9]+)+!`` takes Python's re exponential time on a long module path;
    the linear-time engine reads the folder at once (and the pattern matches nothing)."""
    import time

    folder = peft_folder(tmp_path / "redos", {"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                              "alpha_pattern": {"([a-z_.0-9]+)+!": 2}})
    started = time.perf_counter()
    result = invoke("inspect", "--json", folder)
    assert result.exit_code == 0, result.stderr
    assert time.perf_counter() - started < 20  # Python's re: hours on this path
    assert json.loads(result.stdout)[0]["alphas"] == [4]


def test_infinity_in_tag_frequency_is_shown_not_a_crash(tmp_path, good) -> None:
    src = save(tmp_path / "tags.safetensors", kohya_tensors(),
               {"ss_tag_frequency": '{"d": {"cat": 3, "dog": Infinity, "fox": 1e999}}'})
    result = invoke("inspect", "--json", src)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["metadata"]["top_tags"] == [["cat", 3]]
    out = tmp_path / "out.safetensors"  # never written on: a JSON value holding Infinity
    line = check_refused(invoke("convert", src, "--to", "kohya", "-o", out), inputs=[src], outputs=[out])
    assert "ss_tag_frequency" in line and "Infinity" in line and "out.safetensors" in line
