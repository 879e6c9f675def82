"""Every real adapter in ../shared/fixtures/real/adapters converts to kohya and back with ΔW preserved.

"Back" is the layout the file came in (``formats.output_layout``: the old diffusers layouts are written
again; cloneofsimo, which nothing loads any more, comes back as kohya with its token embeddings beside).
LoKr stays LoKr in kohya (exact); turning it into plain LoRA is lossy and checked against the error the
conversion prints. Written in its own layout, a real file keeps its tensor names.
"""

from __future__ import annotations

import math

import pytest
import torch

from loratool.formats import output_layout, read_adapter, write_adapter
from loratool.io.safetensors import SafetensorsFile
from loratool.linalg import product_sq_norm
from loratool.linalg.structured import structured_factors
from loratool.ops.convert import convert

pytestmark = pytest.mark.real

# our spelling differs from the file's only here: current diffusers loads attention processors only under unet.
RENAMED = {"sd15_diffusers_attnprocs.safetensors": lambda k: f"unet.{k}"}


def _files(real_dir):
    return sorted((real_dir / "adapters").glob("*.safetensors"))


def _rel_diff(m1, m2) -> float:
    """‖ΔW₂ − ΔW₁‖/‖ΔW₁‖ on exact low-rank factorisations (never a dense ΔW of a big conv)."""
    f1, f2 = structured_factors(m1), structured_factors(m2)
    if f1 is None or f2 is None:
        want, got = m1.delta(torch.float64), m2.delta(torch.float64)
        return float((got - want).norm() / want.norm().clamp_min(1e-30))
    up = torch.cat([f1[0], -f2[0]], dim=1)
    down = torch.cat([f1[1], f2[1]], dim=0)
    total = product_sq_norm(*f1)
    return math.sqrt(max(0.0, product_sq_norm(up, down)) / total) if total > 0 else 0.0


def _same_delta(a, b, tol: float) -> None:
    assert set(a.modules) == set(b.modules)
    for key, m in a.modules.items():
        other = b.modules[key]
        if type(m) is type(other) and m.alpha == other.alpha and len(m.tensors()) == len(other.tensors()) and all(
                torch.equal(x, y) for x, y in zip(m.tensors(), other.tensors(), strict=True)):
            continue  # the same factors: the same ΔW
        err = _rel_diff(m, other)
        assert err <= tol, (key, err)


@pytest.fixture(scope="module")
def real_files(real_dir):
    files = _files(real_dir)
    assert len(files) >= 9
    return files


def test_every_real_adapter_to_kohya_and_back(real_files, tmp_path):
    for path in real_files:
        source = read_adapter(path)
        kohya, report = convert(source, "kohya")
        assert report.exact, path.name
        out = tmp_path / f"{path.stem}.kohya.safetensors"
        write_adapter(kohya, out, "kohya")
        with SafetensorsFile(out) as f:
            assert all(k.startswith(("lora_unet_", "lora_te_")) for k in f.keys()), path.name
        again = read_adapter(out)
        _same_delta(source, again, 0.0)  # names only: the very same values
        for key, m in source.modules.items():
            for t_in, t_out in zip(m.tensors(), again.modules[key].tensors(), strict=True):
                assert torch.equal(t_in, t_out) and t_in.dtype == t_out.dtype, (path.name, key)
        back_fmt = output_layout(source).name
        back, _ = convert(again, back_fmt)
        back_path = tmp_path / f"{path.stem}.back.safetensors"
        write_adapter(back, back_path, back_fmt)
        folded = back_fmt in ("aitoolkit", "diffusers-old", "diffusers-attnproc")  # no alpha: √scale folded in
        _same_delta(source, read_adapter(back_path), 2e-3 if folded else 1e-12)
        if source.source_format != "cloneofsimo":
            with SafetensorsFile(path) as f, SafetensorsFile(back_path) as g:
                rename = RENAMED.get(path.name, lambda k: k)
                assert sorted(rename(k) for k in f.keys()) == sorted(g.keys()), path.name


def test_cloneofsimo_embeddings_written_beside_as_textual_inversion(real_dir, tmp_path):
    from click.testing import CliRunner

    from loratool.cli.main import cli

    src = real_dir / "adapters" / "sd15_cloneofsimo_safeloras.safetensors"
    out = tmp_path / "disney.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", "webui", "-o", str(out)])
    assert result.exit_code == 0, result.output
    source = read_adapter(src)
    assert sorted(source.embeddings) == ["<s1>", "<s2>"]
    for token, name in (("<s1>", "disney.s1.safetensors"), ("<s2>", "disney.s2.safetensors")):
        with SafetensorsFile(tmp_path / name) as f:
            assert list(f.keys()) == ["emb_params"]
            emb = f.get("emb_params")
        want = source.embeddings[token]
        assert torch.equal(emb.reshape(want.shape), want)
        assert name in result.output


def test_lokr_to_plain_lora_within_the_printed_bound(real_dir, tmp_path):
    src = read_adapter(real_dir / "adapters" / "sd15_kohya_lycoris_lokr_r4.safetensors")
    keys = [k for k in src.modules if k.startswith("text_encoder.") and ".layers.0." in k]
    keys += [k for k in src.modules if "down_blocks.0.resnets.0" in k or "attentions.0.proj_in" in k][:3]
    sub = type(src)(base_model=src.base_model, source_format=src.source_format, metadata=src.metadata)
    for k in keys:
        sub.add(src.modules[k])
    low, report = convert(sub, "diffusers", rank=8)
    assert {c.action for c in report.changes} == {"svd"} and not report.exact
    out = tmp_path / "lokr_as_lora.safetensors"
    write_adapter(low, out, "diffusers")
    again = read_adapter(out)
    for change in report.changes:
        want = src.modules[change.key].delta(torch.float64)
        got = again.modules[change.key].delta(torch.float64)
        if float(want.norm()) == 0.0:  # an untrained (all-zero) module stays zero
            assert float(got.norm()) == 0.0 and change.rel_error == 0.0
            continue
        err = float((got - want).norm() / want.norm())  # dense float64 reference
        assert err == pytest.approx(change.rel_error, rel=1e-6, abs=1e-9), change.key
        assert change.rel_error < 0.5
    # and back to kohya as plain LoRA: the same ΔW again
    kohya, _ = convert(again, "kohya")
    path = tmp_path / "back.safetensors"
    write_adapter(kohya, path, "kohya")
    _same_delta(again, read_adapter(path), 0.0)
