"""The Qwen-Image MMDiT (20 B, 60 double-stream blocks) in plain PyTorch.

Parameter names are exactly those of diffusers' ``QwenImageTransformer2DModel``, so a diffusers
state dict (or the single-file checkpoints, which use the same keys) loads strictly. Every
projection is ``weights.linear.Linear``, so fp8 / GGUF weights and LoRA patches work here.

Numerics follow diffusers (FACTS 2). Two things differ on purpose:
- when all samples of a batch share one sigma (the usual case, CFG included), the modulation is
  computed once and folded into ``F.layer_norm``'s affine weights: one kernel instead of three;
- float16 keeps the residual streams in float32 and runs each projection on down-scaled
  inputs (power-of-two factors, undone in float32), because Qwen-Image's activations grow far
  past the float16 range (FACTS 7: "fp16 gives black images").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import rope
from ..layers.attention import attention
from ..layers.run_options import RunOptions, resolve
from ..layers.linear import Embedding, Linear

FP16_MAX = 65504.0
_DENSE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.compile (core/pipeline/compile.py) is only offered where torch has it; older torch: never tracing.
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)

# A ControlNet hook: called after block i with the image tokens (target first, then references),
# returns the new image tokens. See QwenImageMMDiT.forward.
ControlHook = Callable[[int, torch.Tensor], torch.Tensor]
REF_METHODS = rope.REF_METHODS


def reference_method(method: str | None, config: "MMDiTConfig") -> tuple[str, bool]:
    """(how references are placed, whether they are modulated at t = 0) for ``method``.

    None is the model's own default: Edit-2511 (``zero_cond_t``) ``index_timestep_zero``,
    Qwen-Image-Layered ``negative_index``, every other model ``index``; ComfyUI's conditioning
    can name another (its "Edit Model Reference Method" node).
    """
    if method is None:
        return ("negative_index" if config.layered else "index"), config.zero_cond_t
    if method not in REF_METHODS:
        raise ValueError(f"unknown reference latent method {method!r}; use one of {', '.join(REF_METHODS)}")
    return method, method == "index_timestep_zero"


def default_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE channels per axis (frame, height, width) for ``head_dim``: (16, 56, 56) for 128."""
    return (head_dim // 8, 7 * head_dim // 16, 7 * head_dim // 16)


@dataclass
class MMDiTConfig:
    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False
    # Qwen-Image-Layered: a learned embedding added to the timestep embedding (row 0 at inference)
    # and the "Layer3D" RoPE (several layer frames in one sequence, references at frames -1, -2, ...).
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self):
        self.axes_dims_rope = tuple(int(a) for a in self.axes_dims_rope)
        if len(self.axes_dims_rope) != 3 or any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope must be three positive even numbers, got {self.axes_dims_rope}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must add up to attention_head_dim {self.attention_head_dim}"
            )
        if self.in_channels != self.out_channels * self.patch_size**2:
            raise ValueError(
                f"in_channels ({self.in_channels}) must be out_channels * patch_size**2 "
                f"({self.out_channels} * {self.patch_size}**2): the latent is packed into patches"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def layered(self) -> bool:
        """A Qwen-Image-Layered model: it samples ``[B, C, L+1, H, W]`` latents (frame 0 the
        composite, then L RGBA layers) and pairs with the RGBA (4-channel) VAE."""
        return self.use_layer3d_rope

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "MMDiTConfig":
        """Read a diffusers ``transformer/config.json`` dict.

        Qwen-Image-Layered's ``use_additional_t_cond`` / ``use_layer3d_rope`` are read; variants
        that change the architecture beyond this class (guidance embedding) are refused, not ignored.
        """
        for flag in ("guidance_embeds",):
            if config.get(flag):
                raise ValueError(f"MMDiT config sets {flag}=true, which this implementation does not support")
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and v is not None}
        if "attention_head_dim" in kwargs and "axes_dims_rope" not in kwargs:
            kwargs["axes_dims_rope"] = default_axes(kwargs["attention_head_dim"])
        return cls(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, eps_scale: float = 1.0) -> torch.Tensor:
        # eps_scale: a down-scaled input (fp16 path) needs eps scaled by the square to stay exact.
        w = self.weight.to(device=x.device, dtype=x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps * eps_scale)


def timestep_sinusoid(t: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """``[cos | sin]`` of ``1000 * t * 10000^(-i/half)`` in float32 (diffusers' operation order)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = 1000 * (t.float()[:, None] * freqs[None, :])
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)


class _TimestepMLP(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.linear_1 = Linear(256, dim, device=device, dtype=dtype)
        self.linear_2 = Linear(dim, dim, device=device, dtype=dtype)


class TimestepEmbedding(nn.Module):
    """The timestep MLP; with ``additional`` (Qwen-Image-Layered) also ``addition_t_embedding``,
    a 2-row table whose row 0 (the only one inference uses: diffusers' ``is_rgb = 0``, ComfyUI's
    default) is added to every timestep embedding."""

    def __init__(self, dim: int, device=None, dtype=None, additional: bool = False):
        super().__init__()
        self.timestep_embedder = _TimestepMLP(dim, device, dtype)
        if additional:
            self.addition_t_embedding = Embedding(2, dim, device=device, dtype=dtype)

    def forward(self, t: torch.Tensor, dtype: torch.dtype, options: RunOptions | None = None) -> torch.Tensor:
        mlp = self.timestep_embedder
        emb = mlp.linear_2(F.silu(mlp.linear_1(timestep_sinusoid(t).to(dtype), options)), options)
        extra = getattr(self, "addition_t_embedding", None)
        if extra is not None:
            ids = torch.zeros(emb.shape[0], dtype=torch.long, device=emb.device)
            emb = emb + extra(ids).to(device=emb.device, dtype=emb.dtype)
        return emb


class _GELUProj(nn.Module):
    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.proj = Linear(dim, hidden, device=device, dtype=dtype)


class FeedForward(nn.Module):
    """diffusers' layout: ``net.0.proj`` (then GELU-tanh), ``net.1`` dropout slot, ``net.2``."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.net = nn.ModuleList(
            [_GELUProj(dim, 4 * dim, device, dtype), nn.Identity(), Linear(4 * dim, dim, device=device, dtype=dtype)]
        )

    def forward(self, x: torch.Tensor, s: float = 1.0, options: RunOptions | None = None) -> torch.Tensor:
        """``s`` times the MLP of ``x / s`` (``x`` arrives already scaled by ``s``)."""
        h = _project(self.net[0].proj, x, s, options)
        if s == 1.0:
            h = F.gelu(h, approximate="tanh")
        else:  # GELU is not homogeneous: evaluate it on the true values, in float32.
            h = F.gelu(h.float().div_(s), approximate="tanh").mul_(s).to(x.dtype)
        return _project(self.net[2], h, s, options)


def _project(layer: Linear, x: torch.Tensor, s: float = 1.0, options: RunOptions | None = None) -> torch.Tensor:
    """``layer`` applied to an input scaled by ``s``, giving ``s * layer(x / s)``.

    Only the input-independent part (the bias and the bias deltas LoRAs add) is not
    homogeneous, so it is rescaled afterwards. With ``s != 1`` (float16 only) infinities are
    also clipped, as diffusers does, so a stray overflow stays finite. ``options``: this call's.
    """
    y = layer(x, options)
    if s != 1.0:
        constant = layer.constant_term(y.dtype, y.device)
        if constant is not None:
            y = y.sub_(constant * (1.0 - s))
        y = y.clamp_(-FP16_MAX, FP16_MAX)
    return y


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, s: float = 1.0) -> torch.Tensor:
    """``s * (LayerNorm(x) * (1 + scale) + shift)`` (no affine of its own); shift / scale are
    ``[dim]`` when the batch shares them, else ``[B, 1, dim]``."""
    weight = scale + 1
    if s != 1.0:
        weight, shift = weight * s, shift * s
    if shift.ndim == 1:  # shared by the batch: LayerNorm's own affine does it in one pass
        return F.layer_norm(x, x.shape[-1:], weight, shift, eps)
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), weight)


class _Modulation:
    """shift / scale / gate of one stream in one block.

    ``params`` is ``[S * R, 6 * dim]``: S token segments (2 for zero_cond_t with reference
    images: target then references), R rows (1 when the whole batch shares a timestep, else B).
    Order of the six chunks: shift1, scale1, gate1, shift2, scale2, gate2.
    """

    def __init__(self, params: torch.Tensor, segments: list[slice], eps: float = 1e-6):
        dim = params.shape[-1] // 6
        self.p = params.view(len(segments), -1, 6, dim)
        self.segments = segments
        self.eps = eps

    def _vec(self, seg: int, k: int) -> torch.Tensor:
        v = self.p[seg, :, k]
        return v[0] if v.shape[0] == 1 else v.unsqueeze(1)

    def norm(self, x: torch.Tensor, half: int, s: float, dtype: torch.dtype) -> torch.Tensor:
        """``s * (LayerNorm(x) * (1 + scale) + shift)`` in ``dtype``."""
        parts = []
        for i, seg in enumerate(self.segments):
            shift, scale = self._vec(i, 3 * half), self._vec(i, 3 * half + 1)
            parts.append(modulated_norm(x[:, seg], shift, scale, self.eps, s))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return y.to(dtype)

    def gate_add_(self, x: torch.Tensor, y: torch.Tensor, half: int, s: float) -> None:
        """``x += gate * y / s`` in place."""
        for i, seg in enumerate(self.segments):
            gate = self._vec(i, 3 * half + 2)
            if s != 1.0:
                gate = gate / s
            x[:, seg].addcmul_(y[:, seg], gate)


class JointAttention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        kw = dict(device=device, dtype=dtype)
        self.to_q, self.to_k, self.to_v = (Linear(dim, dim, **kw) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, dim, **kw) for _ in range(3))
        self.to_out = nn.ModuleList([Linear(dim, dim, **kw)])
        self.to_add_out = Linear(dim, dim, **kw)
        self.norm_q, self.norm_k = RMSNorm(head_dim, **kw), RMSNorm(head_dim, **kw)
        self.norm_added_q, self.norm_added_k = RMSNorm(head_dim, **kw), RMSNorm(head_dim, **kw)

    def forward(self, img, txt, table, mask, s: float = 1.0, need_txt: bool = True, options: RunOptions | None = None):
        """Joint attention over ``[text; image]``; returns (image out, text out or None).

        Queries and keys are normalized and rotated straight into one joint buffer, so the
        only concatenation left is the values'.
        """
        B, n_img, _ = img.shape
        n_txt = txt.shape[1]
        heads, d = self.heads, self.head_dim
        q = img.new_empty(B, n_txt + n_img, heads, d)
        k = torch.empty_like(q)
        streams = (
            (txt, slice(0, n_txt), self.add_q_proj, self.add_k_proj, self.norm_added_q, self.norm_added_k),
            (img, slice(n_txt, None), self.to_q, self.to_k, self.norm_q, self.norm_k),
        )
        traced = _is_compiling()
        for x, seg, proj_q, proj_k, norm_q, norm_k in streams:
            for proj, norm, out in ((proj_q, norm_q, q), (proj_k, norm_k, k)):
                y = norm(_project(proj, x, s, options).unflatten(-1, (heads, d)), s * s)
                if traced:  # torch.compile cannot write out= into a strided view (batch > 1): a graph break
                    out[:, seg] = rope.apply_rope(y, table[:, seg])
                else:
                    rope.apply_rope(y, table[:, seg], out=out[:, seg])
        v = torch.cat([_project(self.add_v_proj, txt, s, options), _project(self.to_v, img, s, options)], dim=1)
        v = v.unflatten(-1, (heads, d))

        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, backend=resolve(options).attention)
        o = o.transpose(1, 2).reshape(B, n_txt + n_img, heads * d)
        img_out = _project(self.to_out[0], o[:, n_txt:], s, options)
        txt_out = _project(self.to_add_out, o[:, :n_txt], s, options) if need_txt else None
        return img_out, txt_out


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.img_mod = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim, **kw))
        self.txt_mod = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim, **kw))
        self.attn = JointAttention(dim, heads, head_dim, **kw)
        self.img_mlp = FeedForward(dim, **kw)
        self.txt_mlp = FeedForward(dim, **kw)
        # Float16 down-scale factors for the attention and MLP inputs (powers of two, exact).
        self.fp16_scales = (1 / 16, 1 / 32)

    def forward(self, img, txt, act_img, act_txt, img_segments, table, mask, dtype, need_txt=True,
                options: RunOptions | None = None):
        """One double-stream block. ``act_*`` are SiLU(temb) rows for the modulation linears;
        ``img``/``txt`` are the residual streams (float32 when ``dtype`` is float16); ``options``
        the call's run options (None: the defaults)."""
        s_attn, s_mlp = self.fp16_scales if dtype == torch.float16 else (1.0, 1.0)
        img_mod = _Modulation(self.img_mod[1](act_img, options), img_segments)
        txt_mod = _Modulation(self.txt_mod[1](act_txt, options), [slice(None)])

        img_out, txt_out = self.attn(
            img_mod.norm(img, 0, s_attn, dtype), txt_mod.norm(txt, 0, s_attn, dtype), table, mask, s_attn, need_txt,
            options,
        )
        img_mod.gate_add_(img, img_out, 0, s_attn)
        img_mod.gate_add_(img, self.img_mlp(img_mod.norm(img, 1, s_mlp, dtype), s_mlp, options), 1, s_mlp)
        if need_txt:
            txt_mod.gate_add_(txt, txt_out, 0, s_attn)
            txt_mod.gate_add_(txt, self.txt_mlp(txt_mod.norm(txt, 1, s_mlp, dtype), s_mlp, options), 1, s_mlp)
        return img, txt


class _OutputNorm(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.linear = Linear(dim, 2 * dim, device=device, dtype=dtype)


def pack_latent(x: torch.Tensor, p: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``[B, C, H, W]`` -> ``[B, (H/p)(W/p), C*p*p]`` tokens and the token grid.

    Odd sizes are padded at the bottom/right, circularly as ComfyUI does; the model crops
    the padding off its output.
    """
    B, C, H, W = x.shape
    ph, pw = (-H) % p, (-W) % p
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="circular")
    h, w = (H + ph) // p, (W + pw) // p
    tokens = x.view(B, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * p * p)
    return tokens, (h, w)


def unpack_tokens(tokens: torch.Tensor, grid: tuple[int, int], p: int, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``pack_latent``, cropped to ``size`` (H, W)."""
    B, _, c = tokens.shape
    h, w = grid
    C = c // (p * p)
    x = tokens.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * p, w * p)
    return x[:, :, : size[0], : size[1]]


class QwenImageMMDiT(nn.Module):
    """Qwen-Image MMDiT; see ``forward``. Build on ``device="meta"`` to load a checkpoint without
    first allocating random weights."""

    def __init__(self, config: MMDiTConfig | None = None, device=None, dtype=None):
        super().__init__()
        self.config = cfg = config or MMDiTConfig()
        dim = cfg.inner_dim
        kw = dict(device=device, dtype=dtype)
        self.time_text_embed = TimestepEmbedding(dim, additional=cfg.use_additional_t_cond, **kw)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim, **kw)
        self.img_in = Linear(cfg.in_channels, dim, **kw)
        self.txt_in = Linear(cfg.joint_attention_dim, dim, **kw)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(dim, cfg.num_attention_heads, cfg.attention_head_dim, **kw) for _ in range(cfg.num_layers)
        )
        self.norm_out = _OutputNorm(dim, **kw)
        self.proj_out = Linear(dim, cfg.patch_size**2 * cfg.out_channels, **kw)
        self._compute_dtype: torch.dtype | None = None
        self._rope_cache: dict[tuple, torch.Tensor] = {}

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of activations: set explicitly, else img_in's weight dtype when it is a plain
        float type, else bfloat16 (fp8 / GGUF checkpoints)."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        w = self.img_in.weight
        return w.dtype if w.dtype in _DENSE_FLOATS else torch.bfloat16

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        if dtype is not None and dtype not in _DENSE_FLOATS:
            raise ValueError(f"compute_dtype must be one of {_DENSE_FLOATS} or None, got {dtype}")
        self._compute_dtype = dtype

    def _rope_table(self, grids: list[tuple[int, int]], text_len: int, device: torch.device,
                    frames: tuple[int, ...] | None = None, min_text_start: int = 0,
                    offsets: tuple[tuple[int, int], ...] | None = None) -> torch.Tensor:
        # Everything the table depends on: two calls sharing a key get the same positions.
        key = (tuple(grids), text_len, str(device), frames, min_text_start, offsets)
        table = self._rope_cache.get(key)
        if table is None:
            if len(self._rope_cache) >= 8:
                self._rope_cache.pop(next(iter(self._rope_cache)))
            table = rope.build_rope(grids, text_len, self.config.axes_dims_rope, device,
                                    frames=frames, min_text_start=min_text_start, offsets=offsets)
            self._rope_cache[key] = table
        return table

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        ref_latents: list[torch.Tensor] | None = None,
        control: ControlHook | None = None,
        options: RunOptions | None = None,
        ref_method: str | None = None,
    ) -> torch.Tensor:
        """Predict the flow velocity.

        x: normalized latent ``[B, C, H, W]`` (or ``[B, C, 1, H, W]``), any H, W. A Layered model
            (``config.layered``) also takes ``[B, C, F, H, W]``: F frames (the composite, then the
            layers) denoised as one sequence, frame-major, at RoPE frames 0 .. F-1.
        sigma: ``[B]`` (or a scalar) in [0, 1]; the timestep embedding sees ``1000 * sigma``.
        context: text hidden states ``[B, L, joint_attention_dim]`` (batch 1 is broadcast).
        context_mask: ``[B, L]``, True / 1 for real tokens; needed when a batch mixes prompts
            of different lengths (padding must not be attended). None: every token is real.
        ref_latents: normalized reference latents ``[B or 1, C, h_i, w_i]`` for edit models;
            they join the image sequence after the target, placed by ``ref_method`` (by default
            at RoPE frames 1, 2, ...; Layered: -1, -2, ..., the input image whose layers are made).
        control: ``control(block_index, img_tokens) -> img_tokens``, called after every block
            with the image residual stream ``[B, N, dim]`` (target tokens first, in packed
            row-major order, then the references; float32 under float16 compute). InstantX
            residuals add ``samples[i // interval]`` to ``img_tokens[:, :n_target]``;
            DiffSynth patches add their block's output the same way. It may modify in place
            and return None. Models it runs take their own options (none: the defaults). A hook
            with ``takes_txt = True`` is called ``control(i, img, txt)`` and returns ``(img, txt)``
            (ComfyUI's block patches read and change the text stream); every block then updates txt.
        options: how this call computes (attention backend, float8 matmuls, GGUF kernels), for
            this call only; None: ``run_options.DEFAULT``.
        ref_method: how the references are placed, by ComfyUI's names (``REF_METHODS``):
            ``index`` frames 1, 2, ...; ``index_timestep_zero`` the same, modulated at t = 0;
            ``negative_index`` frames -1, -2, ...; ``offset`` / ``uxo`` all at frame 1, side by
            side. None: the model's default (``reference_method``).
        Returns the velocity ``[B, C, H, W]`` (same rank) in ``x``'s dtype.
        """
        cfg = self.config
        five_d = x.ndim == 5
        if five_d:
            if x.shape[2] != 1 and not cfg.layered:
                raise ValueError(
                    f"x must hold a single frame, got shape {tuple(x.shape)}: only a Qwen-Image-Layered model "
                    "denoises several frames (layers) at once"
                )
            if x.shape[2] < 1:
                raise ValueError(f"x holds no frame, got shape {tuple(x.shape)}")
            frames_x = list(x.unbind(2)) if x.shape[2] > 1 else [x[:, :, 0]]
        else:
            frames_x = [x]
        method, ref_at_zero = reference_method(ref_method, cfg)
        x = frames_x[0]
        if x.ndim != 4 or x.shape[1] != cfg.out_channels:
            raise ValueError(f"x must be [B, {cfg.out_channels}, H, W], got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        device, out_dtype = x.device, x.dtype
        dtype = self.compute_dtype
        # float16: residual streams and the small per-sample layers run in float32.
        wide = torch.float32 if dtype == torch.float16 else dtype
        p = cfg.patch_size

        sigma = self._check_sigma(sigma, B, device)
        context, mask = self._check_context(context, context_mask, B, device)

        grids, seqs = [], []
        for frame in frames_x:  # frame-major: all tokens of frame 0, then frame 1, ...
            tokens, grid = pack_latent(frame, p)
            grids.append(grid)
            seqs.append(tokens.to(wide))
        n_frames = len(frames_x)
        ref_sizes = []
        for ref in ref_latents or []:
            ref = self._check_ref(ref, B)
            ref_sizes.append(tuple(ref.shape[-2:]))  # the side-by-side layout reads unpadded sizes
            ref_tokens, ref_grid = pack_latent(ref, p)
            grids.append(ref_grid)
            seqs.append(ref_tokens.to(device=device, dtype=wide).expand(B, -1, -1))
        n_target = n_frames * grid[0] * grid[1]
        img = self.img_in(torch.cat(seqs, dim=1) if len(seqs) > 1 else seqs[0], options)
        txt = self.txt_in(self.txt_norm(context.to(wide)), options)

        # One modulation row when the batch shares its timestep (cond + uncond of CFG).
        shared = B == 1 or bool((sigma == sigma[0]).all())
        t = sigma[:1] if shared else sigma
        rows = t.shape[0]
        if ref_at_zero and ref_sizes:  # Edit-2511: reference tokens are modulated as if clean (t = 0).
            t = torch.cat([t, torch.zeros_like(t)])
            img_segments = [slice(0, n_target), slice(n_target, None)]
        else:
            img_segments = [slice(None)]
        temb = self.time_text_embed(t.to(dtype), wide, options)
        act = F.silu(temb)

        # Target frames 0..F-1, references where the method puts them; Layered: text after the layers.
        ref_frames, ref_offsets = rope.reference_placement(method, ref_sizes, p)
        offsets = None if ref_offsets is None else tuple([(0, 0)] * n_frames + ref_offsets)
        table = self._rope_table(grids, txt.shape[1], device, tuple(range(n_frames)) + ref_frames,
                                 n_frames if cfg.layered else 0, offsets)
        if mask is not None:  # image tokens are always attended
            mask = torch.cat([mask, mask.new_ones(B, img.shape[1])], dim=1)[:, None, None, :]
        # The text stream's last update feeds nothing (skipped) unless a hook reads it.
        takes_txt = bool(getattr(control, "takes_txt", False))
        txt_blocks = len(self.transformer_blocks) - (0 if takes_txt else 1)
        for i, block in enumerate(self.transformer_blocks):
            img, txt = block(img, txt, act, act[:rows], img_segments, table, mask, dtype, need_txt=i < txt_blocks,
                             options=options)
            if takes_txt:
                img, txt = control(i, img, txt)
            elif control is not None:
                changed = control(i, img)
                img = img if changed is None else changed

        scale, shift = self.norm_out.linear(act[:rows], options).chunk(2, dim=-1)  # scale first, unlike the blocks
        if rows == 1:
            scale, shift = scale[0], shift[0]
        else:
            scale, shift = scale.unsqueeze(1), shift.unsqueeze(1)
        out = self.proj_out(modulated_norm(img[:, :n_target], shift, scale), options)
        if n_frames > 1:
            per = grid[0] * grid[1]
            out = torch.stack([unpack_tokens(out[:, f * per:(f + 1) * per], grid, p, (H, W))
                               for f in range(n_frames)], dim=2)
            return out.to(out_dtype)
        out = unpack_tokens(out, grid, p, (H, W)).to(out_dtype)
        return out.unsqueeze(2) if five_d else out

    @staticmethod
    def _check_sigma(sigma, batch: int, device) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=device).float().reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if sigma.numel() != batch:
            raise ValueError(f"sigma must be a scalar or have {batch} entries (one per sample), got {sigma.numel()}")
        return sigma

    def _check_context(self, context, context_mask, batch: int, device):
        dim = self.config.joint_attention_dim
        if context.ndim != 3 or context.shape[-1] != dim or context.shape[0] not in (1, batch):
            raise ValueError(f"context must be [{batch}, L, {dim}], got shape {tuple(context.shape)}")
        context = context.to(device).expand(batch, -1, -1)
        if context_mask is None:
            return context, None
        if context_mask.shape[-1] != context.shape[1] or context_mask.ndim != 2 or context_mask.shape[0] not in (1, batch):
            raise ValueError(
                f"context_mask must be [{batch}, {context.shape[1]}] to match context, got {tuple(context_mask.shape)}"
            )
        mask = context_mask.to(device) != 0
        mask = mask.expand(batch, -1)
        # Padding no sample uses can go: text positions of the remaining tokens are unchanged,
        # and a batch without padding then runs unmasked (the fast attention kernels).
        used = mask.any(dim=0).nonzero()
        keep = int(used[-1]) + 1 if used.numel() else 1
        context, mask = context[:, :keep], mask[:, :keep]
        return context, (None if bool(mask.all()) else mask)

    def _check_ref(self, ref: torch.Tensor, batch: int) -> torch.Tensor:
        if ref.ndim == 5 and ref.shape[2] == 1:
            ref = ref[:, :, 0]
        c = self.config.out_channels
        if ref.ndim != 4 or ref.shape[1] != c or ref.shape[0] not in (1, batch):
            raise ValueError(f"each reference latent must be [{batch} or 1, {c}, h, w], got shape {tuple(ref.shape)}")
        return ref
