"""Tiny random reference models from diffusers / transformers, shared by the end-to-end tests.

Weights are randomized beyond the libraries' default init (which leaves biases at zero and norm
gains at one) so that every tensor we load actually influences the result.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
    max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
    stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
    use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False,
)

TEXT_HIDDEN = 256  # tiny text encoder width = the tiny MMDiT's joint_attention_dim
VOCAB = 152064  # the real vocabulary, so the real tokenizer's ids are valid


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and p.ndim == 1 or name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_transformer(seed: int = 0, joint_dim: int = TEXT_HIDDEN, layers: int = 2, **kw):
    from diffusers import QwenImageTransformer2DModel

    cfg = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=layers, attention_head_dim=32,
               num_attention_heads=2, joint_attention_dim=joint_dim, axes_dims_rope=(4, 14, 14))
    cfg.update(kw)
    model = QwenImageTransformer2DModel(**cfg).eval()
    _randomize(model, seed)
    return model


def tiny_vae(seed: int = 1):
    from diffusers import AutoencoderKLQwenImage

    model = AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                   attn_scales=[], temperal_downsample=[False, True, True]).eval()
    _randomize(model, seed, std=0.08)
    return model


def tiny_text_encoder(seed: int = 2):
    import transformers

    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB, hidden_size=TEXT_HIDDEN, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=TEXT_HIDDEN, fullatt_block_indexes=[0]),
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    return model


def original_text_layout(sd: dict) -> dict:
    """transformers-5 names -> the names in the published checkpoints (model.layers.*, visual.*)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        out[k] = v.contiguous()
    return out


def copy_tokenizer(tokenizer_dir: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, dest / f)
    return dest
