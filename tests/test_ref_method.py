"""Reference-latent methods: where an edit model's reference images sit (ComfyUI's names).

ComfyUI 0.30's Qwen model (comfy/ldm/qwen_image/model.py) lets a CONDITIONING's
``reference_latents_method`` override the model's default: ``index`` frames 1, 2, ...;
``index_timestep_zero`` the same with the references modulated at t = 0 (Edit-2511);
``negative_index`` frames -1, -2, ... (Layered); ``offset`` / ``uxo`` all at frame 1, laid side
by side. The positions here are checked against tables worked out by hand from ComfyUI's loop;
tests/integration/bridge_probe.py compares whole outputs with ComfyUI's own model.

The tiny models barely react to RoPE at weight std 0.05, so the tests that need outputs to
depend on positions set the q / k RMSNorm weights to 4 (sharp attention).
"""
from __future__ import annotations

import pytest
import torch

from qwenimage_pack.core.layers import rope
from qwenimage_pack.core.models import mmdit
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT

TEXT_DIM = 48


def _model(sharp: bool = True, **config) -> QwenImageMMDiT:
    torch.manual_seed(0)
    cfg = MMDiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                      axes_dims_rope=(8, 12, 12), **config)
    model = QwenImageMMDiT(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.05)
            if sharp and ".norm_" in name:  # q / k norms: attention logits 16x, positions matter
                p.fill_(4.0)
    return model


def _inputs(seed: int = 1, frames: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 12, generator=g) if frames is None else torch.randn(1, 16, frames, 8, 12, generator=g)
    ctx = torch.randn(x.shape[0], 5, TEXT_DIM, generator=g)
    refs = [torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 4, 12, generator=g),
            torch.randn(1, 16, 8, 4, generator=g)]
    return x, ctx, refs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _run(model, x, ctx, refs, method, sigma=(0.6, 0.4)):
    with torch.no_grad():
        return model(x, torch.tensor(sigma[: x.shape[0]]), ctx, ref_latents=refs, ref_method=method)


# ---------------------------------------------------------------------------------------------
# Positions


def test_side_by_side_offsets_follow_comfyui_layout():
    # Latent sizes (h, w). ComfyUI: box (0, 0); a reference goes right (column offset = box width)
    # when h + box_h > w + box_w, else below (row offset = box height); offsets -> patches, half up.
    sizes = [(4, 4), (4, 8), (8, 2)]
    # (4,4): 4 > 4 no -> below at row 0: (0, 0), box (4, 4)
    # (4,8): 8 > 12 no -> below at row 4 -> 2 patches, box (8, 8)
    # (8,2): 16 > 10 yes -> right at column 8 -> 4 patches, box (8, 10)
    assert rope.side_by_side_offsets(sizes, 2) == [(0, 0), (2, 0), (0, 4)]
    # odd latent offsets round half up: (5,6) then (4,4): 9 > 10 no -> row 5 -> (5 + 1) // 2 = 3
    assert rope.side_by_side_offsets([(5, 6), (4, 4)], 2) == [(0, 0), (3, 0)]
    assert rope.side_by_side_offsets([], 2) == []


def test_reference_placement_per_method():
    sizes = [(4, 4), (4, 8)]
    assert rope.reference_placement("index", sizes, 2) == ((1, 2), None)
    assert rope.reference_placement("index_timestep_zero", sizes, 2) == ((1, 2), None)
    assert rope.reference_placement("negative_index", sizes, 2) == ((-1, -2), None)
    for method in ("offset", "uxo"):
        assert rope.reference_placement(method, sizes, 2) == ((1, 1), [(0, 0), (2, 0)])
    with pytest.raises(ValueError, match="index_timestep_zero"):
        rope.reference_placement("uxo/uno", sizes, 2)


def test_offset_positions_of_two_references_match_a_table_by_hand():
    # Target latent 4x4 (grid 2x2), references 4x4 (grid 2x2) and 4x8 (grid 2x4), 2 text tokens.
    frames, offsets = rope.reference_placement("offset", [(4, 4), (4, 8)], 2)
    got = rope.joint_positions([(2, 2), (2, 2), (2, 4)], 2, (0,) + frames, 0, [(0, 0)] + offsets)
    want = [
        # text from max(h//2, w//2) over the grids = 2 (offsets do not move it, as in ComfyUI)
        (2, 2, 2), (3, 3, 3),
        # target, frame 0, rows / columns -1..0
        (0, -1, -1), (0, -1, 0), (0, 0, -1), (0, 0, 0),
        # reference 1, frame 1, no offset
        (1, -1, -1), (1, -1, 0), (1, 0, -1), (1, 0, 0),
        # reference 2, frame 1, 2 rows down: rows -1..0 + 2, columns -2..1
        (1, 1, -2), (1, 1, -1), (1, 1, 0), (1, 1, 1),
        (1, 2, -2), (1, 2, -1), (1, 2, 0), (1, 2, 1),
    ]
    assert got.tolist() == [list(p) for p in want]


def test_zero_offsets_give_the_same_table_bit_for_bit():
    grids = [(3, 5), (2, 2), (4, 3)]
    plain = rope.build_rope(grids, 4, (8, 12, 12))
    assert torch.equal(plain, rope.build_rope(grids, 4, (8, 12, 12), offsets=[(0, 0)] * 3))
    assert torch.equal(plain, rope.build_rope(grids, 4, (8, 12, 12), frames=(0, 1, 2)))


def _positions_seen(monkeypatch) -> list[torch.Tensor]:
    """Each RoPE table the MMDiT builds, as the positions it was built from."""
    seen = []
    build = rope.build_rope

    def recording(grids, text_len, axes_dims, device=None, theta=rope.THETA, frames=None, min_text_start=0,
                  offsets=None):
        seen.append(rope.joint_positions(grids, text_len, frames, min_text_start, offsets))
        return build(grids, text_len, axes_dims, device, theta, frames, min_text_start, offsets)

    monkeypatch.setattr(mmdit.rope, "build_rope", recording)
    return seen


@pytest.mark.parametrize("layered", [False, True])
def test_mmdit_places_references_by_method(monkeypatch, layered):
    model = _model(use_layer3d_rope=layered, use_additional_t_cond=layered)
    seen = _positions_seen(monkeypatch)
    frames = 2 if layered else None
    x, ctx, refs = _inputs(frames=frames)
    n_target = (frames or 1) * 4 * 6
    sizes = [tuple(r.shape[-2:]) for r in refs]
    for method in ("index", "negative_index", "offset"):
        _run(model, x, ctx, refs, method)
        pos = seen[-1]
        ref_pos = pos[5 + n_target:]
        ref_frames, offsets = rope.reference_placement(method, sizes, 2)
        want = torch.cat([rope.image_positions(f, h // 2, w // 2, off) for f, (h, w), off in
                          zip(ref_frames, sizes, offsets or [(0, 0)] * 3)])
        assert torch.equal(ref_pos, want), method
        # the target keeps frames 0.. and its own grid; Layered text starts after its layers
        assert torch.equal(pos[5:5 + n_target, 0], torch.arange(frames or 1).repeat_interleave(24))
        assert int(pos[0, 0]) == 3
    # ComfyUI's side-by-side rows / columns for these sizes: (8,8) at (0,0); (4,12): 16 > 20 no ->
    # 8 rows down = 4 patches; (8,4): 20 > 16 yes -> 12 columns right (the box is 12 wide) = 6 patches
    assert rope.side_by_side_offsets(sizes, 2) == [(0, 0), (4, 0), (0, 6)]


# ---------------------------------------------------------------------------------------------
# Outputs


@pytest.mark.parametrize("config, default", [
    ({}, "index"),
    ({"zero_cond_t": True}, "index_timestep_zero"),
    ({"use_layer3d_rope": True, "use_additional_t_cond": True}, "negative_index"),
])
def test_no_method_is_the_config_default_bit_for_bit(config, default):
    model = _model(**config)
    x, ctx, refs = _inputs()
    assert torch.equal(_run(model, x, ctx, refs, None), _run(model, x, ctx, refs, default))
    assert mmdit.reference_method(None, model.config) == (
        "negative_index" if model.config.layered else "index", model.config.zero_cond_t)


def test_index_on_a_2511_model_is_the_plain_path_and_back():
    plain, zero = _model(), _model(zero_cond_t=True)
    zero.load_state_dict(plain.state_dict())
    x, ctx, refs = _inputs()
    assert torch.equal(_run(zero, x, ctx, refs, "index"), _run(plain, x, ctx, refs, None))
    assert torch.equal(_run(plain, x, ctx, refs, "index_timestep_zero"), _run(zero, x, ctx, refs, None))
    # and the two really differ (the t = 0 modulation of the references)
    assert _rel(_run(zero, x, ctx, refs, "index"), _run(zero, x, ctx, refs, None)) > 1e-3


def test_methods_change_the_output_and_the_table_cache_tells_them_apart():
    model = _model()
    x, ctx, refs = _inputs()
    out = {m: _run(model, x, ctx, refs, m) for m in ("index", "negative_index", "offset", "uxo")}
    assert torch.equal(out["offset"], out["uxo"])  # ComfyUI's Qwen model treats them alike
    assert _rel(out["index"], out["negative_index"]) > 1e-3
    assert _rel(out["index"], out["offset"]) > 1e-3
    # same grids, different positions: a fresh model (empty cache) gives the same answers
    fresh = _model()
    for m in ("offset", "index", "negative_index"):
        assert torch.equal(_run(fresh, x, ctx, refs, m), out[m])


def test_method_without_references_changes_nothing():
    model = _model(zero_cond_t=True)
    x, ctx, _ = _inputs()
    assert torch.equal(_run(model, x, ctx, None, "offset"), _run(model, x, ctx, None, None))


def test_unknown_method_names_the_allowed_ones():
    model = _model()
    x, ctx, refs = _inputs()
    with pytest.raises(ValueError) as err:
        _run(model, x, ctx, refs, "uxo/uno")
    assert all(m in str(err.value) for m in mmdit.REF_METHODS)


# ---------------------------------------------------------------------------------------------
# The sampler keeps each conditioning's method


class _Recorder(torch.nn.Module):
    """Stands in for the MMDiT: records the batch and reference method of every call."""

    class config:
        joint_attention_dim = 8
        layered = False

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, sigma, context, ref_latents=None, ref_method=None, **kw):
        self.calls.append((x.shape[0], len(ref_latents or []), ref_method))
        return x * 0.5 + context.mean() * self.w


def _sample(module, positive, negative, cfg=3.0):
    from qwenimage_pack.nodes import sampling
    from qwenimage_pack.nodes.handles import DiffusionModel

    handle = DiffusionModel(module=module, name="recorder", variant="qwen-image-edit", weight_format="float32")
    return sampling.sample(handle, positive, {"samples": torch.zeros(1, 16, 8, 8)}, 0, 2, cfg, negative=negative,
                           device="cpu")


def _cond(seed, ref=None, method=None):
    extra = {}
    if ref is not None:
        extra["reference_latents"] = [ref]
    if method is not None:
        extra["reference_latents_method"] = method
    return [[torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(seed)), extra]]


def test_sampler_passes_each_conditionings_method():
    ref = torch.randn(1, 16, 8, 8)
    # different methods: positive and negative run apart, each with its own
    module = _Recorder()
    _sample(module, _cond(1, ref, "offset"), _cond(2, ref, "index_timestep_zero"))
    assert module.calls == [(1, 1, "offset"), (1, 1, "index_timestep_zero")] * 2
    # the same method: one batched call carrying it
    module = _Recorder()
    _sample(module, _cond(1, ref, "offset"), _cond(2, ref, "offset"))
    assert module.calls == [(2, 1, "offset")] * 2
    # none set: the model's default (no argument), still batched
    module = _Recorder()
    _sample(module, _cond(1, ref), _cond(2, ref))
    assert module.calls == [(2, 1, None)] * 2
    # a method without references means nothing (ComfyUI reads it only with references)
    module = _Recorder()
    _sample(module, _cond(1, None, "offset"), None, cfg=1.0)
    assert module.calls == [(1, 0, None)] * 2


def test_sampler_names_an_unknown_method_before_sampling():
    module = _Recorder()
    with pytest.raises(ValueError, match="negative conditioning has reference_latents_method 'sideways'"):
        _sample(module, _cond(1, torch.randn(1, 16, 8, 8)), _cond(2, torch.randn(1, 16, 8, 8), "sideways"))
    assert module.calls == []
