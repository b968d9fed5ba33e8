"""A DFloat11 model as a ComfyUI MODEL with a LoRA from ComfyUI's own loader, in a real ComfyUI.

ComfyUI maps a LoRA's keys from the model's state dict; a DFloat11 block keeps its weights
compressed, so the bridge lists them (placeholders) and the patcher refuses the LoRA by name
(it would otherwise be dropped key by key with a log line, the image unchanged). Sampling
without a LoRA is unaffected. The tiny DFloat11 folder is written here, with the dfloat11
package's own encoder (system Python); skipped without it or without COMFYUI_DIR.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_harness import run_probe

pytest.importorskip("dahuffman")


def test_a_core_lora_on_a_dfloat11_model_is_refused_by_name(tmp_path):
    from test_dfloat11_load import TINY, write_df11  # the published layout, the package's encoder
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    ref = QwenImageTransformer2DModel(**TINY)
    sd16 = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
    folder = write_df11(tmp_path / "Qwen-Image-DF11", sd16)
    assert run_probe("dfloat11_lora_probe.py", str(folder)) == {
        "compressed_keys_listed": True,
        "plain_sampling_runs": True,
        "lora_key_reaches_the_patcher": True,
        "lora_refused_by_name": True,
    }
