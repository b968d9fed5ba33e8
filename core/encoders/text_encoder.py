"""Qwen2.5-VL language model, used as Qwen-Image's text encoder.

Only the decoder stack is here: the image conditioning (vision tower, image-token
positions) enters through ``inputs_embeds`` and ``position_ids``. The output is the last
hidden state after the final norm, which is what Qwen-Image conditions on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tokenizer import encode_prompt_ids
from ..layers.linear import FP8_DTYPES, Embedding, Linear


@dataclass
class TextEncoderConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    head_dim: int = 128
    intermediate_size: int = 18944
    rms_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)

    def __post_init__(self) -> None:
        self.mrope_section = tuple(int(s) for s in self.mrope_section)
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"text encoder config: {self.num_heads} attention heads cannot share "
                f"{self.num_kv_heads} key/value heads evenly"
            )
        if len(self.mrope_section) != 3 or 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(
                f"text encoder config: mrope_section {self.mrope_section} must be 3 sizes "
                f"adding up to head_dim/2 = {self.head_dim // 2}"
            )

    @classmethod
    def from_hf_config(cls, config: Mapping) -> "TextEncoderConfig":
        """From a transformers ``config.json`` dict: flat (4.x) or with ``text_config`` (5.x)."""
        text = dict(config)
        if isinstance(config.get("text_config"), Mapping):
            # 5.x nests the language model; fall back to top-level values it leaves out.
            text.update(config["text_config"])
        rope = {}
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(text.get(key), Mapping):
                rope.update(text[key])
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            kw = dict(
                vocab_size=int(text["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(text["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(text.get("num_key_value_heads") or heads),
                intermediate_size=int(text["intermediate_size"]),
            )
        except KeyError as e:
            raise ValueError(f"text encoder config.json lacks {e.args[0]!r}") from None
        # transformers' Qwen2.5-VL attention splits hidden/heads and ignores any head_dim entry.
        kw["head_dim"] = hidden // heads
        kw["rms_eps"] = float(text.get("rms_norm_eps", cls.rms_eps))
        kw["rope_theta"] = float(rope.get("rope_theta", text.get("rope_theta", cls.rope_theta)))
        kw["mrope_section"] = tuple(rope.get("mrope_section", cls.mrope_section))
        return cls(**kw)


def default_mrope_sections(head_dim: int) -> tuple[int, int, int]:
    """The 7B's (16, 24, 24) split of head_dim/2 frequencies, scaled to another head size."""
    half = head_dim // 2
    if half == 64:
        return (16, 24, 24)
    t = half // 4
    h = (half - t) // 2
    return (t, h, half - t - h)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32, then back to the activation dtype before the gain, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(device=x.device, dtype=x.dtype) * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=True)
        self.k_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.v_proj = Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=True)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotation of the (i, i + d/2) pairs ("rotate half" layout), as the checkpoint was trained.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def text_position_ids(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """M-RoPE positions ``[3, B, L]`` for text only: 0.. counted over real tokens, so a
    left-padded row gets the same positions as the unpadded prompt (padding gets 1)."""
    if attention_mask is None:
        pos = torch.arange(length, device=device).expand(batch, length)
    else:
        m = attention_mask.to(device=device, dtype=torch.long)
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 1)
    return pos.unsqueeze(0).expand(3, batch, length)


class QwenTextEncoder(nn.Module):
    def __init__(self, config: TextEncoderConfig | None = None):
        super().__init__()
        self.config = config = config or TextEncoderConfig()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)
        self._compute_dtype: torch.dtype | None = None

    @property
    def compute_dtype(self) -> torch.dtype:
        """Activation dtype: set explicitly, else the weights' float dtype, else bf16
        (fp8 / GGUF weights are dequantized to it)."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        w = self.embed_tokens.weight
        if w.is_floating_point() and w.dtype not in FP8_DTYPES and not self.embed_tokens.is_quantized:
            return w.dtype
        return torch.bfloat16

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        self._compute_dtype = dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[B, 1, L, head_dim]`` from positions ``[3, B, L]``."""
        # Tables are rebuilt per call, not kept as buffers: model.to(bf16) would round them and
        # meta-device construction would leave them empty. fp32 on the CPU as the reference
        # makes them, since positions reach ~1000 and any other rounding shows in the angles.
        cfg = self.config
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim
        inv = (1.0 / (cfg.rope_theta ** exponents)).to(position_ids.device)
        angles = position_ids.float().unsqueeze(-1) * inv  # [3, B, L, half]
        # Which M-RoPE axis (temporal, height, width) drives each frequency.
        axis = torch.cat([torch.full((n,), i) for i, n in enumerate(cfg.mrope_section)]).to(position_ids.device)
        picked = angles.gather(0, axis.view(1, 1, 1, -1).expand(1, *angles.shape[1:])).squeeze(0)
        picked = torch.cat((picked, picked), dim=-1).unsqueeze(1)
        return picked.cos().to(dtype), picked.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last hidden state after the final norm, ``[B, L, hidden]`` in ``compute_dtype``.

        ``inputs_embeds`` replaces the token lookup (image features already scattered in);
        ``position_ids`` is ``[3, B, L]`` (temporal, height, width) or ``[B, L]`` for text.
        ``attention_mask`` ``[B, L]`` marks real tokens with 1; left or right padding.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("QwenTextEncoder.forward: pass exactly one of input_ids or inputs_embeds")
        dtype = self.compute_dtype
        if inputs_embeds is None:
            if input_ids.dim() == 1:
                input_ids = input_ids.unsqueeze(0)
            self.embed_tokens.compute_dtype = dtype
            x = self.embed_tokens(input_ids.to(self.device))
        else:
            x = inputs_embeds.to(device=self.device, dtype=dtype)
        b, n, _ = x.shape

        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, n):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(b, n)}")
            attention_mask = attention_mask.to(self.device)
            if bool(attention_mask.all()):
                attention_mask = None

        if position_ids is None:
            position_ids = text_position_ids(attention_mask, b, n, self.device)
        else:
            position_ids = position_ids.to(self.device)
            if position_ids.dim() == 2:
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
            if position_ids.shape[0] != 3 or tuple(position_ids.shape[1:]) != (b, n):
                raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected (3, {b}, {n})")
        cos, sin = self.rope(position_ids, dtype)

        mask = None
        if attention_mask is not None:
            keep = attention_mask.bool()
            causal = torch.ones(n, n, dtype=torch.bool, device=self.device).tril()
            mask = causal & keep[:, None, None, :]
            # A padding row would otherwise see nothing and give NaN; let it see itself.
            mask = mask | torch.eye(n, dtype=torch.bool, device=self.device)

        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


def encode_text(model: QwenTextEncoder, tokenizer, prompt: str, kind: str = "t2i", max_tokens: int = 1024,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Prompt embedding ``[1, L, hidden]`` as diffusers' ``_get_qwen_prompt_embeds`` makes it:
    the whole template runs through the model (one prompt, so no padding mask) and the
    template's leading system tokens are cut from the result.

    Only text-to-image here: edit templates carry an image placeholder that needs the vision
    tower's features and 3-D positions (``inputs_embeds`` / ``position_ids`` of ``forward``).
    ``device`` is where the token ids go (default: the embedding's device).
    """
    if kind != "t2i":
        raise ValueError(
            f"encode_text: kind {kind!r} needs image features from the Qwen2.5-VL vision tower; "
            "only 't2i' prompts can be encoded from text alone"
        )
    ids, drop = encode_prompt_ids(tokenizer, prompt, kind=kind, max_tokens=max_tokens)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids], dtype=torch.long, device=device or model.device))
    return hidden[:, drop:]
