"""Tiny random reference models from diffusers / transformers, shared by the end-to-end tests.

Weights are randomized beyond the libraries' default init (which leaves biases at zero and norm
gains at one) so that every tensor we load actually influences the result.
"""
from __future__ import annotations

import contextlib
import os
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


# The smallest MMDiT that still has several heads, both streams and all three RoPE axes.
TINY_MMDIT = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=48, axes_dims_rope=(4, 14, 14))

TINY_INNER_DIM = TINY_MMDIT["num_attention_heads"] * TINY_MMDIT["attention_head_dim"]  # 64


def tiny_mmdit_bf16_state(seed: int = 0) -> dict:
    """Our tiny MMDiT's state dict with N(0, 0.05) weights, in bf16: a file's contents."""
    from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT

    torch.manual_seed(seed)
    model = QwenImageMMDiT(MMDiTConfig(**TINY_MMDIT))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if v is not None}


def fp8_block_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Store ``module``'s transformer-block Linear weights as float8 e4m3 with a per-tensor scale
    (amax / 448), as a scaled-fp8 checkpoint holds them; returns the module."""
    from qwenimage_pack.core.layers.linear import Linear

    for name, m in module.named_modules():
        if isinstance(m, Linear) and name.startswith("transformer_blocks."):
            w = m.weight.detach()
            scale = w.abs().amax() / 448
            m.weight = torch.nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
            m.set_scale(scale)
    return module


def diffsynth_patch_state(g: torch.Generator, layers: int, extra: int = 0) -> dict:
    """A DiffSynth blockwise patch for the tiny MMDiT: img_in (``extra`` more input channels for
    the inpainting patch) plus per-block x_rms / y_rms / input_proj / output_proj."""
    d = TINY_INNER_DIM
    sd = {"img_in.weight": torch.randn(d, 64 + extra, generator=g) * 0.1, "img_in.bias": torch.randn(d, generator=g) * 0.1}
    for i in range(layers):
        p = f"controlnet_blocks.{i}."
        sd[p + "x_rms.weight"] = torch.rand(d, generator=g) + 0.5
        sd[p + "y_rms.weight"] = torch.rand(d, generator=g) + 0.5
        for name in ("input_proj", "output_proj"):
            sd[p + name + ".weight"] = torch.randn(d, d, generator=g) * 0.1
            sd[p + name + ".bias"] = torch.randn(d, generator=g) * 0.1
    return sd


# One MMDiT double-stream block's 32 tensors (diffusers' names), [out, in] in units of the width d.
_BLOCK_LINEARS = {"img_mod.1": (6, 1), "txt_mod.1": (6, 1), "attn.to_q": (1, 1), "attn.to_k": (1, 1),
                  "attn.to_v": (1, 1), "attn.add_q_proj": (1, 1), "attn.add_k_proj": (1, 1), "attn.add_v_proj": (1, 1),
                  "attn.to_out.0": (1, 1), "attn.to_add_out": (1, 1), "img_mlp.net.0.proj": (4, 1),
                  "img_mlp.net.2": (1, 4), "txt_mlp.net.0.proj": (4, 1), "txt_mlp.net.2": (1, 4)}
_BLOCK_NORMS = ("attn.norm_q", "attn.norm_k", "attn.norm_added_q", "attn.norm_added_k")


def fun_controlnet_state(g: torch.Generator, blocks: int = 5, dim: int = TINY_INNER_DIM, head_dim: int = 32,
                         in_features: int = 132, std: float = 0.1) -> dict:
    """A Qwen-Image-2512 Fun ControlNet file's tensors, named as VideoX-Fun saves them (unprefixed):
    ``control_img_in``, ``control_blocks.N.`` + a double-stream block's 32 tensors + ``after_proj``,
    ``before_proj`` on block 0 only (174 tensors for 5 blocks). Written out by name here, not taken
    from our module, so the layout is the file's and not ours."""
    def linear(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) * std, torch.randn(out_f, generator=g) * std

    sd = {}
    sd["control_img_in.weight"], sd["control_img_in.bias"] = linear(dim, in_features)
    for i in range(blocks):
        p = f"control_blocks.{i}."
        for name, (o, n) in _BLOCK_LINEARS.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = linear(o * dim, n * dim)
        for name in _BLOCK_NORMS:
            sd[p + name + ".weight"] = torch.rand(head_dim, generator=g) + 0.5
        if i == 0:
            sd[p + "before_proj.weight"], sd[p + "before_proj.bias"] = linear(dim, dim)
        sd[p + "after_proj.weight"], sd[p + "after_proj.bias"] = linear(dim, dim)
    return sd


def tiny_transformer(seed: int = 0, joint_dim: int = TEXT_HIDDEN, layers: int = 2, **kw):
    from diffusers import QwenImageTransformer2DModel

    cfg = dict(TINY_MMDIT, num_layers=layers, joint_attention_dim=joint_dim)
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


def qwen25vl_reference(layers: int = 2, vision_depth: int = 1, vision_intermediate: int = 64,
                       vocab: int = 1000, seed: int = 0):
    """transformers' Qwen2.5-VL at hidden 256 (the loader tests' reference): norms in [0.5, 1.5],
    every other weight N(0, 0.05). ``vision_intermediate`` 40 is no multiple of 16 or 32, like the
    real tower's 3420 (nvfp4 / mxfp8 store it padded)."""
    import transformers

    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=256, intermediate_size=384, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-6, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=vision_intermediate, num_heads=2,
                           out_hidden_size=256, fullatt_block_indexes=[0]),
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.05)
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


DIT_FILE = "qwen_image_tiny.safetensors"
TEXT_ENCODER_FILE = "qwen_2.5_vl_tiny.safetensors"
VAE_FILE = "qwen_image_vae_tiny.safetensors"


def write_model_files(root: Path, tokenizer_dir: Path, transformer, vae, text_encoder,
                      dit_prefix: str = "model.diffusion_model.", dit_file: str = DIT_FILE) -> None:
    """The three models in the layouts users download: the MMDiT as a ComfyUI split file (with
    ``dit_prefix``), the text encoder in the original checkpoint names with its tokenizer beside
    it, the VAE in diffusers names."""
    from safetensors.torch import save_file

    for folder in ("diffusion_models", "text_encoders", "vae"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    save_file({dit_prefix + k: v.contiguous() for k, v in transformer.state_dict().items()},
              root / "diffusion_models" / dit_file)
    save_file(original_text_layout(text_encoder.state_dict()), root / "text_encoders" / TEXT_ENCODER_FILE)
    copy_tokenizer(tokenizer_dir, root / "text_encoders" / "qwen25_tokenizer")
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, root / "vae" / VAE_FILE)


@contextlib.contextmanager
def models_dir(root: Path):
    """Point the nodes' plain-Python model folder ($QWENIMAGE_MODELS_DIR) at ``root`` for a while."""
    old = os.environ.get("QWENIMAGE_MODELS_DIR")
    os.environ["QWENIMAGE_MODELS_DIR"] = str(root)
    try:
        yield root
    finally:
        if old is None:
            os.environ.pop("QWENIMAGE_MODELS_DIR", None)
        else:
            os.environ["QWENIMAGE_MODELS_DIR"] = old
