"""Key parsing, layout detection and family detection work on keys, shapes and metadata alone and import
no torch (a later issue makes ``inspect`` run without importing it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import sys
from loratool.arch import detect_adapter, detect_checkpoint, family, lbw_weights
from loratool.formats import output_layout
from loratool.formats.detect import detect_keys
from loratool.formats.keys import weight_dims
from loratool.formats.layouts import LAYOUTS

shapes = {
    "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (4, 3072),
    "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (9216, 4),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 768),
    "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": (3072, 4),
}
report = detect_keys(shapes)
ids = sorted({r.module_id for r in report.refs.values()})
dims = [weight_dims({r.role: shapes[k] for k, r in report.refs.items() if r.module_id == i}) for i in ids]
detection, places = detect_adapter(ids, dims, {"ss_base_model_version": "sd_1.5"})
assert detection.family == "flux" and detection.evidence == ("keys",), detection
assert {p.key for p in places} == {"transformer.transformer_blocks.0.attn.to_qkv",
                                   "text_encoder.text_model.encoder.layers.0.mlp.fc1"}
assert detect_checkpoint({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}).family == "sd3"
assert family("sdxl").spell("kohya", "unet", "down_blocks.1.attentions.0.proj_in").name.startswith("input_blocks_4")
assert lbw_weights("sd1", "ALL")["MID"] == 1.0 and len(LAYOUTS) > 10
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
print("ok")
"""


def test_detection_imports_no_torch():
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, capture_output=True, text=True,
                            env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
