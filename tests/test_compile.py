"""Opt-in torch.compile of the MMDiT blocks (core/pipeline/compile.py, nodes/compile.py) on the CPU.

Numbers: inductor's output is checked against diffusers' QwenImageTransformer2DModel and our
eager model. Recompiles: dynamo's own count of the graphs it compiled while sizes, prompt
lengths, references, batch sizes, weight formats, LoRAs and block streaming change; dynamo
decides those whatever the backend, so the other tests use its cheapest backend, "eager".
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import references as refs
from qwenimage_pack.core.pipeline import compile as block_compile
from qwenimage_pack.core.layers import rope
from qwenimage_pack.core.pipeline import streaming
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT, TransformerBlock
from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.core.layers.lora_patch import apply_loras
from qwenimage_pack.core.loading.lora import parse_lora

LAYERS = 3  # two blocks share the "text stream continues" graph, the last one has its own
TOL = 1e-5


@pytest.fixture(autouse=True)
def fresh():
    block_compile.reset()
    yield
    block_compile.reset()


def _pair(zero_cond_t=False, layers=LAYERS):
    ref = refs.tiny_transformer(seed=3, joint_dim=48, layers=layers, zero_cond_t=zero_cond_t)
    ours = QwenImageMMDiT(MMDiTConfig.from_diffusers_config(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture(scope="module")
def pair():
    return _pair()


def _copy(model):
    """A private copy of the shared model. Its RoPE table cache is emptied: deepcopy turns the
    cached inference-mode tables into ordinary tensors, which dynamo tells apart (a recompile
    that sampling, always in inference mode, never sees)."""
    model = copy.deepcopy(model)
    model._rope_cache.clear()
    return model


def _inputs(b, h, w, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, h, w, generator=g)
    context = torch.randn(b, text_len, 48, generator=g)
    sigma = torch.full((b,), 0.6)
    return x, sigma, context


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _run(model, args, settings=None, **kwargs):
    with torch.inference_mode(), block_compile.compiled(model, settings):
        return model(*args, **kwargs)


def _diffusers(ref, x, sigma, context):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    b, c, h, w = x.shape
    with torch.no_grad():
        out = ref(hidden_states=QwenImagePipeline._pack_latents(x, b, c, h, w), encoder_hidden_states=context,
                  timestep=sigma, img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return QwenImagePipeline._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]


class _Graphs:
    """How many graphs dynamo has compiled since this object was made."""

    def __init__(self):
        self.start = counters["stats"]["unique_graphs"]

    @property
    def count(self) -> int:
        return counters["stats"]["unique_graphs"] - self.start


CHEAP = block_compile.CompileSettings("eager")


def _block_inputs(block, b, n_img, n_txt, n_target, seed):
    """Arguments of ``TransformerBlock.forward`` as the model builds them (two modulation segments)."""
    g = torch.Generator().manual_seed(seed)
    dim = block.img_mod[1].in_features
    img, txt = torch.randn(b, n_img, dim, generator=g), torch.randn(b, n_txt, dim, generator=g)
    act = torch.randn(2, dim, generator=g)
    table = rope.build_rope([(n_target // 4, 4), (2, (n_img - n_target) // 2)], n_txt, (4, 14, 14))
    mask = torch.ones(b, 1, 1, n_txt + n_img, dtype=torch.bool)
    mask[1, ..., n_txt - 2:n_txt] = False  # the second prompt is two tokens shorter
    segments = [slice(0, n_target), slice(n_target, None)]
    return img, txt, act, act[:1], segments, table, mask, torch.float32


def test_inductor_block_matches_eager_and_is_reused_for_new_sizes(pair):
    # One graph with everything symbolic at once: image / text tokens, the Edit-2511 target /
    # reference split, a text mask and a batch of 2. (Inductor on the CPU compiles C++: one graph.)
    _, ours = pair
    block = ours.transformer_blocks[0]
    settings = block_compile.CompileSettings("inductor")
    compiler = block_compile._BlockCompiler(settings)
    graphs = _Graphs()
    for n_target, n_ref, n_txt in [(64, 8, 7), (96, 16, 11)]:
        args = _block_inputs(block, 2, n_target + n_ref, n_txt, n_target, seed=n_txt)
        with torch.inference_mode():
            want = block(*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
            with block_compile.compiler_settings():
                got = compiler.forward(block, *args)
        if block_compile.failure(settings):
            pytest.skip(f"inductor does not work here: {block_compile.failure(settings)}")
        assert _rel(got[0], want[0]) <= TOL and _rel(got[1], want[1]) <= TOL
    assert graphs.count == 1


def test_compile_count_fixed_across_sizes_prompts_references_batches(pair):
    ref, ours = pair
    graphs, settings = _Graphs(), CHEAP

    def check(args, **kwargs):
        assert _rel(_run(ours, args, settings, **kwargs), _run(ours, args, **kwargs)) <= 1e-6

    # 16x16 latent = 64 image tokens = the model width: a size coincidence must not pin the size
    for h, w, text_len in [(16, 16, 7), (18, 14, 7), (12, 32, 12), (26, 18, 12)]:
        check(_inputs(1, h, w, text_len))
    args = _inputs(1, 18, 14)
    assert _rel(_run(ours, args, settings), _diffusers(ref, *args)) <= TOL
    assert graphs.count == 2
    ref_latents = [torch.randn(1, 16, 12, 12), torch.randn(1, 16, 8, 16)]
    check(_inputs(1, 20, 24), ref_latents=ref_latents[:1])  # edit references only lengthen the sequence
    check(_inputs(1, 16, 16), ref_latents=ref_latents)
    assert graphs.count == 2
    check(_inputs(2, 16, 16))  # batch 1 -> 2 (true CFG): once more per graph, then shared by all sizes
    check(_inputs(2, 22, 12, text_len=11))
    check(_inputs(3, 12, 12), ref_latents=ref_latents)
    assert graphs.count == 4


def test_real_width_official_sizes_share_one_graph():
    # The real block (3072 wide, 24 heads) on meta tensors: dynamo traces shapes, nothing is
    # computed. 1024^2, 1328^2 (odd grid), 928x1664 with a 3072-token prompt, 1024x768 (3072
    # image tokens = the model width).
    block = TransformerBlock(3072, 24, 128, device="meta", dtype=torch.bfloat16).eval()
    compiler = block_compile._BlockCompiler(CHEAP)
    graphs = _Graphs()

    def run(batch, grid, n_txt):
        img = torch.empty(batch, grid[0] * grid[1], 3072, device="meta", dtype=torch.bfloat16)
        txt = torch.empty(batch, n_txt, 3072, device="meta", dtype=torch.bfloat16)
        act = torch.empty(1, 3072, device="meta", dtype=torch.bfloat16)
        table = rope.build_rope([grid], n_txt, (16, 56, 56)).to("meta")
        with torch.inference_mode(), block_compile.compiler_settings():
            out = compiler.forward(block, img, txt, act, act, [slice(None)], table, None, torch.bfloat16)
        assert out[0].shape == img.shape

    for grid, n_txt in [((64, 64), 128), ((83, 83), 40), ((58, 104), 3072), ((64, 48), 96)]:
        run(1, grid, n_txt)
    assert graphs.count == 1
    for grid, n_txt in [((64, 64), 128), ((104, 58), 77)]:
        run(2, grid, n_txt)
    assert graphs.count == 2


def test_zero_cond_t_target_reference_split_is_not_a_constant():
    # Edit-2511: target and reference tokens are modulated apart. One block: one graph.
    _, ours = _pair(zero_cond_t=True, layers=1)
    graphs, settings = _Graphs(), CHEAP
    for (h, w), ref_size, text_len in [((16, 16), (12, 12), 7), ((20, 14), (16, 8), 9), ((12, 24), (12, 12), 7)]:
        args = _inputs(1, h, w, text_len)
        kwargs = dict(ref_latents=[torch.randn(1, 16, *ref_size)])
        assert _rel(_run(ours, args, settings, **kwargs), _run(ours, args, **kwargs)) <= 1e-6
    assert graphs.count == 1


def test_failed_compilation_warns_once_and_runs_eager(pair, caplog):
    _, ours = pair

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler found")

    settings = block_compile.CompileSettings(broken_backend)
    args = _inputs(1, 16, 16)
    with caplog.at_level(logging.WARNING):
        first = _run(ours, args, settings)
        with torch.inference_mode(), block_compile.compiled(ours, settings) as active:
            second = ours(*args)
    assert not active  # remembered: not retried for the rest of the session
    eager = _run(ours, args)
    assert torch.equal(first, eager) and torch.equal(second, eager)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "eager" in warnings[0]
    assert "no C++ compiler found" in block_compile.failure(settings)
    assert all("forward" not in vars(b) for b in ours.transformer_blocks)  # the blocks are restored


def _lora_state(model, rank=4, seed=5):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(LAYERS):
        for name in ("attn.to_q", "attn.add_v_proj", "img_mlp.net.2", "txt_mod.1"):
            lin = model.get_submodule(f"transformer_blocks.{i}.{name}")
            key = f"transformer_blocks.{i}.{name}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.1
            state[f"{key}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.1
    return state


def test_lora_compiled_matches_eager_lora(pair):
    _, base = pair
    model = _copy(base)
    apply_loras(model, [(parse_lora(_lora_state(model), model, "mem.safetensors"), 0.8)])
    graphs, settings = _Graphs(), CHEAP
    plain = _run(base, _inputs(1, 16, 16))
    for h, w in [(16, 16), (18, 14), (12, 24)]:
        args = _inputs(1, h, w)
        eager = _run(model, args)
        assert _rel(_run(model, args, settings), eager) <= 1e-6
    assert _rel(_run(model, _inputs(1, 16, 16)), plain) > 1e-3  # the LoRA does change the output
    # the LoRA's device copies are made on first use: one more graph, then none for new sizes
    assert graphs.count <= 4


def test_fp8_and_gguf_weights_streamed_with_control_hooks(pair):
    # The low-VRAM setup: compact weights, blocks streamed by hooks around each block, and a
    # ControlNet hook between blocks; both kinds of hook stay outside the compiled code.
    gguf = pytest.importorskip("gguf")
    _, base = pair
    model = _copy(base)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, lin in model.transformer_blocks.named_modules():
        if not isinstance(lin, Linear):
            continue
        w = lin.weight.detach()
        if "mlp" in name or "mod" in name:  # GGUF Q8_0 blocks, dequantized inside the layer
            lin.set_quantized(torch.from_numpy(gguf.quants.quantize(w.numpy(), q8)), int(q8), tuple(w.shape))
        else:  # float8 with a per-tensor scale
            scale = w.abs().max() / 448
            lin.weight = torch.nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
            lin.set_scale(scale)
    calls = []

    def control(i, img):
        calls.append(i)
        img[:, :4] += 0.1 * (i + 1)

    graphs, settings = _Graphs(), CHEAP
    for h, w, text_len in [(16, 16, 7), (18, 14, 9)]:
        args = _inputs(1, h, w, text_len)
        eager = _run(model, args, control=control)
        with streaming.BlockStreamer(model.transformer_blocks, "cpu", "cpu", prefetch=1) as streamer:
            got = _run(model, args, settings, control=control)
        assert _rel(got, eager) <= 1e-6
        # the streaming hooks ran around every compiled block
        assert streamer.stats.order[:LAYERS] == list(range(LAYERS))
    assert calls == list(range(LAYERS)) * 4
    assert graphs.count == 2  # fresh weight copies every call, new sizes: no recompile


def test_node_returns_a_new_handle_and_the_sampler_compiles():
    from qwenimage_pack.nodes import sampling
    from qwenimage_pack.nodes.compile import QwenImageTorchCompile
    from qwenimage_pack.nodes.handles import DiffusionModel

    torch.manual_seed(0)
    ours = QwenImageMMDiT(MMDiTConfig(**{**refs.TINY_MMDIT, "num_layers": 1})).eval()  # one block: one graph
    handle = DiffusionModel(module=ours, name="tiny.safetensors", variant="qwen-image", weight_format="float32",
                            options={"attention": "sdpa"})
    node = QwenImageTorchCompile()
    (compiled_handle,) = node.apply(handle, "eager", "default")
    assert compiled_handle is not handle and compiled_handle.module is ours
    assert compiled_handle.options == {"attention": "sdpa", "compile": {"backend": "eager", "mode": "default"}}
    assert handle.options == {"attention": "sdpa"}  # the original handle stays uncompiled
    with pytest.raises(ValueError, match="inductor"):
        node.apply(handle, "tensorrt", "default")
    required = QwenImageTorchCompile.INPUT_TYPES()["required"]
    assert required["backend"][1]["default"] == "inductor" and "first run" in required["mode"][1]["tooltip"]

    positive = [[torch.randn(1, 7, 48, generator=torch.Generator().manual_seed(4)), {}]]
    latent = {"samples": torch.zeros(1, 16, 16, 16)}
    plain = sampling.sample(handle, positive, latent, seed=3, steps=2, cfg=1.0, device="cpu")
    assert ours not in block_compile._compilers  # a handle without the option compiles nothing
    got = sampling.sample(compiled_handle, positive, latent, seed=3, steps=2, cfg=1.0, device="cpu")
    assert _rel(got["samples"], plain["samples"]) <= 1e-6
    assert any(c._fns for c in block_compile._compilers[ours].values())  # the compiled path ran
    assert all("forward" not in vars(b) for b in ours.transformer_blocks)
