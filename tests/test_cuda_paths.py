"""Every CUDA path of the pack against a reference computed on the CPU, on tiny models.

Marked ``cuda`` and skipped without CUDA, so CI (no GPU) stays green; bench/gpu_check.sh runs
them first on a lent GPU (``pytest tests/test_cuda_paths.py -m cuda``). Covered: bf16 / fp16
forward vs fp32; float8 matmuls (row-wise and tensor-wise scales, the fallback chain) vs the
dequantized weights; every GGUF type through the compiled dequantization kernels vs gguf-py;
the prefetching block streamer (streams, events, pinned and unpinned host copies) vs the
resident model; LoRA folding into GPU weights and the exact restore from the file; compiled
blocks vs eager; each attention backend vs SDPA; tiled VAE decode vs untiled, and the tiled
fallback on a real out-of-memory error; DFloat11 blocks decoded on the device (bit-exact with the
CPU, resident and streamed, eager and compiled; needs the dfloat11 package's encoder).

``QWENIMAGE_CUDA_TESTS_ON=cpu`` runs the same checks on the CPU (where they can run at all): a
way to debug this file without a GPU, not a substitute for the GPU run.
"""
from __future__ import annotations

import copy
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from qwenimage_pack.core.layers import attention, file_views, host_memory
from qwenimage_pack.core.quant import fp8_matmul
from qwenimage_pack.core.pipeline import streaming
from qwenimage_pack.core.pipeline import compile as block_compile
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT
from qwenimage_pack.core.layers.run_options import RunOptions
from qwenimage_pack.core.encoders.vae import VAEConfig, WanVAE
from qwenimage_pack.core.layers import fold
from qwenimage_pack.core.quant import compiling, gguf_dequant as dequant, gguf_kernels
from qwenimage_pack.core.layers.linear import Linear

STAND_IN = os.environ.get("QWENIMAGE_CUDA_TESTS_ON", "").strip().lower() == "cpu"
DEV = torch.device("cpu" if STAND_IN else "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not STAND_IN and not torch.cuda.is_available(),
                       reason="needs CUDA (bench/gpu_check.sh runs these on a GPU)"),
]
real_cuda = pytest.mark.skipif(STAND_IN, reason="checks a CUDA-only behaviour")
E4M3 = getattr(torch, "float8_e4m3fn", None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tiny_mmdit(layers: int = 3, seed: int = 0) -> QwenImageMMDiT:
    """Widths that suit float8 matmuls (multiples of 16) and GGUF blocks (multiples of 256)."""
    torch.manual_seed(seed)
    cfg = MMDiTConfig(num_layers=layers, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64,
                      axes_dims_rope=(16, 56, 56))
    model = QwenImageMMDiT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" not in name:
                p.normal_(0, 0.05)  # biases matter too
    return model


def inputs(device=DEV, dtype=torch.float32, size=(12, 16), text=7, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, *size, generator=g)
    context = torch.randn(batch, text, 64, generator=g)
    sigma = torch.full((batch,), 0.6)
    return x.to(device, dtype), sigma.to(device), context.to(device, dtype)


def forward(model, args, options: RunOptions | None = None) -> torch.Tensor:
    with torch.inference_mode():
        return model(*args, options=options)


def fp8_on(mode: str) -> RunOptions:
    """A call asking for float8 matmuls (on the stand-in CPU too)."""
    return RunOptions(fp8_matmul=mode, fp8_on_cpu=STAND_IN)


FP8_OFF = RunOptions(fp8_matmul=None)


@pytest.fixture(scope="module")
def reference():
    """The tiny model and its fp32 CPU output: the reference most checks compare with."""
    model = tiny_mmdit()
    return model, forward(model, inputs("cpu"))


# -- dtypes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)],
                         ids=["fp32", "bf16", "fp16"])
def test_forward_dtypes_match_fp32_on_the_cpu(reference, dtype, tol):
    model, ref = reference
    out = forward(copy.deepcopy(model).to(DEV, dtype), inputs(dtype=dtype))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert rel(out, ref) < tol


# -- float8 matmuls ----------------------------------------------------------------------------

@pytest.fixture
def fp8_switch():
    """Kernel refusals learnt by other tests (monkeypatched kernels) must not leak in or out."""
    fp8_matmul.reset()
    yield
    fp8_matmul.reset()


def fp8_linear(out_f=256, in_f=512, bias=True, seed=0) -> tuple[Linear, torch.Tensor]:
    """A Linear with an e4m3 weight and per-tensor scale on DEV, and its dequantized fp64 weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    scale = w.abs().amax() / 448
    lin = Linear(in_f, out_f, bias=bias)
    lin.weight = torch.nn.Parameter((w / scale).to(E4M3), requires_grad=False)
    lin.set_scale(scale)
    if bias:
        with torch.no_grad():
            lin.bias.normal_(0, 0.1, generator=g)
    exact = lin.weight.double() * scale.double()
    return lin.to(DEV), exact


def activations(dtype, rows=64, cols=512, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-1, 2, rows)[:, None]  # rows of very different size
    return x.to(DEV, dtype)


@pytest.mark.skipif(E4M3 is None, reason="torch without float8")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["row", "tensor"])
def test_fp8_matmul_matches_the_dequantized_weight(fp8_switch, mode, dtype, bias):
    lin, exact = fp8_linear(bias=bias)
    x = activations(dtype)
    ref = x.double().cpu() @ exact.T + (lin.bias.double().cpu() if bias else 0)
    assert fp8_matmul.device_supports(DEV, STAND_IN), "this GPU has no float8 tensor cores (compute capability < 8.9)"
    with torch.inference_mode():
        out = lin(x, fp8_on(mode))
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert rel(out, ref) < 3e-2  # activations rounded to float8 (3 mantissa bits), rows scaled separately
    if mode == "tensor" or dtype == torch.bfloat16:
        # the fast path itself ran: nothing was refused (fp16 row-wise may legitimately fall back)
        assert not fp8_matmul._broken, f"float8 kernel refused: {fp8_matmul._broken}"


@pytest.mark.skipif(E4M3 is None, reason="torch without float8")
def test_fp8_fallback_chain(fp8_switch, monkeypatch):
    """Row-wise refused -> per-tensor; everything refused -> the exact dequantized matmul."""
    lin, _ = fp8_linear()
    x = activations(torch.bfloat16)
    with torch.inference_mode():
        dequantized = lin(x, FP8_OFF)  # not asked for: the exact path
        tensor_wise = lin(x, fp8_on("tensor"))
        real = torch._scaled_mm

        def no_rowwise(a, b, scale_a=None, scale_b=None, **kw):
            if scale_a is not None and scale_a.numel() > 1:
                raise RuntimeError("row-wise scaling refused (test)")
            return real(a, b, scale_a=scale_a, scale_b=scale_b, **kw)

        monkeypatch.setattr(torch, "_scaled_mm", no_rowwise)
        assert torch.equal(lin(x, fp8_on("auto")), tensor_wise)

        def refuse(*a, **kw):
            raise RuntimeError("no float8 kernel (test)")

        monkeypatch.setattr(torch, "_scaled_mm", refuse)
        fp8_matmul.reset()  # forget the refusals of the monkeypatched kernel above: this one refuses everything
        assert torch.equal(lin(x, fp8_on("auto")), dequantized)


@pytest.mark.skipif(E4M3 is None, reason="torch without float8")
def test_fp8_model_forward_close_to_bf16(fp8_switch, reference):
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    model, ref = reference
    fp8 = copy.deepcopy(model).to(DEV, torch.bfloat16)
    common.to_fp8(fp8)
    args = inputs(dtype=torch.bfloat16)
    dequantized = forward(fp8, args, FP8_OFF)
    fast = forward(fp8, args, fp8_on("auto"))
    assert bool(torch.isfinite(fast).all())
    assert rel(dequantized, ref) < 5e-2 and rel(fast, ref) < 8e-2


# -- block streaming ---------------------------------------------------------------------------

def streamed_setup(model: QwenImageMMDiT, dtype=torch.bfloat16):
    """(resident copy on DEV, copy whose blocks live on the CPU and the rest on DEV)."""
    resident = copy.deepcopy(model).to(DEV, dtype)
    streamed = copy.deepcopy(model).to(dtype)
    for name, child in streamed.named_children():
        if name != "transformer_blocks":
            child.to(DEV)
    return resident, streamed


@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "unpinned"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_block_streamer_equals_the_resident_model(reference, prefetch, pin):
    model, _ = reference
    resident, streamed = streamed_setup(model)
    args = inputs(dtype=torch.bfloat16)
    ref = forward(resident, args)
    blocks = streamed.transformer_blocks
    with streaming.BlockStreamer(blocks, DEV, "cpu", prefetch=prefetch, pin=pin) as st:
        first, second = forward(streamed, args), forward(streamed, args)  # the second starts on a wrapped prefetch
        if DEV.type == "cuda":
            assert all(t.is_pinned() == pin for b in blocks for t in streaming._tensors(b))
    assert torch.equal(first, ref) and torch.equal(second, ref)
    assert all(t.device.type == "cpu" for b in blocks for t in streaming._tensors(b))  # back on the host
    assert st.stats.max_resident <= 1 + prefetch
    if prefetch:
        assert st.stats.prefetch_hits == 2 * len(blocks) - 1


def test_block_streamer_moves_float8_weights_as_stored(reference):
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    model, _ = reference
    resident, streamed = streamed_setup(model)
    common.to_fp8(resident)
    common.to_fp8(streamed)
    args = inputs(dtype=torch.bfloat16)
    ref = forward(resident, args)
    with streaming.BlockStreamer(streamed.transformer_blocks, DEV, "cpu", prefetch=1):
        out = forward(streamed, args)
    assert torch.equal(out, ref)


# -- LoRA folded into GPU weights --------------------------------------------------------------

def random_lora(model, rank=4, seed=5) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, lin in model.named_modules():
        if isinstance(lin, Linear) and name.startswith("transformer_blocks."):
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, lin.in_features, generator=g) * 0.1
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.1
    return sd


def test_lora_fold_then_restore_gives_the_file_weights_back(reference, tmp_path):
    import warnings

    from safetensors.torch import save_file

    from qwenimage_pack.core.loading.load import load_mmdit
    from qwenimage_pack.core.layers.lora_patch import apply_loras
    from qwenimage_pack.core.loading.lora import parse_lora

    model, _ = reference
    path = tmp_path / "dit.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, str(path))
    module = load_mmdit(path)  # weights are views of the file, as in ComfyUI
    linears = {n: m for n, m in module.named_modules() if isinstance(m, Linear)}
    views = {n: file_views.file_view(m, "weight") for n, m in linears.items()}
    assert all(v is not None for v in views.values()), "the loader kept no file views"
    host_memory.move(module, DEV)  # what placement does
    if DEV.type == "cpu":  # stand-in run: a copy in fresh memory plays the GPU copy
        for p in module.parameters():
            p.data = p.data.clone()
    args = inputs(dtype=torch.bfloat16)
    plain = forward(module, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights = parse_lora(random_lora(module), module, "random.safetensors", metadata={})
    apply_loras(module, [(weights, 1.0)])
    additive = forward(module, args)
    assert fold.fold(module, allow_cpu=STAND_IN) == len(weights.layers) > 0
    folded = forward(module, args)
    assert rel(folded, additive) < 1e-2 and rel(additive, plain) > 1e-3  # the LoRA matters; folding keeps it
    apply_loras(module, [])  # removing restores from the file
    for n, m in linears.items():
        assert m.weight.device.type == DEV.type and not m.folded
        assert torch.equal(m.weight.cpu(), views[n]), f"{n}: weight not restored exactly"
    assert torch.equal(forward(module, args), plain)
    host_memory.move(module, "cpu")  # eviction: the file's memory again, no copy
    assert all(m.weight.data_ptr() == views[n].data_ptr() for n, m in linears.items())


# -- attention backends ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cudnn", "flash", "sage"])
def test_attention_backend_matches_sdpa(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 333, 128, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    q, k, v = (t.to(DEV, torch.bfloat16) for t in (q, k, v))
    if attention.resolve(backend) != backend:
        pytest.skip(f"{backend} attention is not installed here")
    out = attention.attention(q, k, v, backend=backend)
    assert attention.failure(backend) is None, f"{backend} fell back to SDPA: {attention.failure(backend)}"
    assert rel(out, ref) < 1e-2 and rel(F.scaled_dot_product_attention(q, k, v), ref) < 1e-2


# -- VAE ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(4)
    return WanVAE(VAEConfig(base_dim=8)).eval()


def test_vae_decode_tiled_and_untiled_match_the_cpu(vae):
    z = torch.randn(1, 16, 20, 28, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cpu_full, cpu_tiled = vae.decode(z), vae.decode_tiled(z, tile=12, overlap=4)
    gpu = copy.deepcopy(vae).to(DEV)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), torch.no_grad():
        full, tiled = gpu.decode(z.to(DEV)), gpu.decode_tiled(z.to(DEV), tile=12, overlap=4)
    assert rel(full, cpu_full) < 1e-4 and rel(tiled, cpu_tiled) < 1e-4
    # tiled vs untiled differ on the GPU exactly as they do on the CPU (same function)
    assert abs(rel(tiled, full) - rel(cpu_tiled, cpu_full)) < 1e-3


@real_cuda
def test_vae_decode_auto_falls_back_to_tiles_on_a_real_out_of_memory(vae, caplog):
    gpu = copy.deepcopy(vae).to(DEV)
    z = torch.randn(1, 16, 160, 160, device=DEV, generator=torch.Generator(DEV).manual_seed(6))
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        tiled = gpu.decode_tiled(z, tile=32, overlap=8)
    tiled_peak = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(DEV).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 3 * tiled_peak) / total))
    try:
        with caplog.at_level(logging.WARNING), torch.no_grad():
            auto = gpu.decode_auto(z, tile=32, overlap=8)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert any("ran out of memory" in r.message for r in caplog.records), "the untiled decode did not run out of memory"
    assert rel(auto, tiled) < 1e-3


# -- DFloat11: blocks whose weights are decoded on the device just before they run ----------------

@pytest.fixture(scope="module")
def df11_models():
    """``tiny_mmdit`` in bf16 with every block compressed by the dfloat11 package's encoder
    (tests/test_dfloat11.py's ``compress``; skipped without the package), and the plain model."""
    encoder = pytest.importorskip("test_dfloat11")
    from qwenimage_pack.core.quant import dfloat11 as df11

    plain = tiny_mmdit(2).to(torch.bfloat16)
    model = copy.deepcopy(plain)
    for block in model.transformer_blocks:
        layout = df11.layout_of(block, encoder.QWEN_PATTERN)
        df11.attach(block, df11.DF11Group(encoder.compress([block.get_submodule(n).weight for n, _ in layout]), layout))
    return model, plain


def test_dfloat11_decodes_on_the_device_bit_exactly_resident_and_streamed(df11_models, caplog, monkeypatch):
    from qwenimage_pack.core.quant import dfloat11 as df11

    model, plain = df11_models
    group = model.transformer_blocks[0].df11
    cpu, dev = group.decode_flat(check=True), group.decode_flat(device=DEV, check=True)
    assert dev.device.type == DEV.type and torch.equal(dev.cpu().view(torch.int16), cpu.view(torch.int16))
    args = inputs(dtype=torch.bfloat16)
    ref = forward(copy.deepcopy(plain).to(DEV), args)
    assert torch.equal(forward(copy.deepcopy(model).to(DEV), args), ref)  # compressed tensors on the device
    streamed = copy.deepcopy(model)
    for name, child in streamed.named_children():
        if name != "transformer_blocks":
            child.to(DEV)
    monkeypatch.setattr(df11, "_warned_copy", False)
    with caplog.at_level(logging.WARNING), streaming.BlockStreamer(streamed.transformer_blocks, DEV, "cpu", prefetch=1):
        out = forward(streamed, args)
    assert torch.equal(out, ref)
    assert not any("copied for each decode" in r.message for r in caplog.records)  # decoded from the upload


# The compiling checks come last: were the step's time limit reached, only they would be lost.

# -- torch.compile of the blocks ---------------------------------------------------------------

def test_compiled_blocks_equal_eager(reference):
    block_compile.reset()
    model, ref = reference
    gpu = copy.deepcopy(model).to(DEV, torch.bfloat16)
    settings = block_compile.CompileSettings("inductor")
    for size in [(12, 16), (20, 14)]:  # a second size: dynamic shapes, no error
        args = inputs(dtype=torch.bfloat16, size=size)
        eager = forward(gpu, args)
        with block_compile.compiled(gpu, settings) as on:
            compiled = forward(gpu, args)
        assert on and block_compile.failure(settings) is None, block_compile.failure(settings)
        assert rel(compiled, eager) < 2e-2
    assert rel(compiled, forward(model, inputs("cpu", size=(20, 14)))) < 4e-2
    block_compile.reset()


# -- GGUF: compiled dequantization kernels -----------------------------------------------------

def gguf_cases():
    try:
        from gguf_writer_util import ALL_QUANTIZED
    except ImportError:  # gguf-py missing: the cases are skipped below
        return []
    return [t for t in ALL_QUANTIZED if int(t) in dequant.QUANTIZED_TYPES]


@pytest.fixture
def compiled_dequant():
    gguf_kernels.reset()
    old = gguf_kernels.min_elements
    gguf_kernels.min_elements = 0
    yield
    gguf_kernels.min_elements = old
    gguf_kernels.reset()


def compiled_result(raw: torch.Tensor, qtype: int, cols: int, dtype) -> torch.Tensor:
    """The compiled kernel's own output, failing if it was abandoned for the eager kernel (a
    compiler error or a mismatch). The shape is registered the way a model's weights are
    (``prepare``); were there no ``prepare``, the second call of a shape compiles."""
    if hasattr(gguf_kernels, "prepare"):
        lin = Linear(cols, raw.shape[0], bias=False)
        lin.set_quantized(raw, qtype, (raw.shape[0], cols))
        gguf_kernels.prepare(lin)
    gguf_kernels.fused_dequantize(raw, qtype, cols, dtype)
    out = gguf_kernels.fused_dequantize(raw, qtype, cols, dtype)
    key = (int(qtype), tuple(raw.shape), cols, dtype, raw.device)
    assert not gguf_kernels._failed, "torch.compile failed: the fused dequantization fell back to eager"
    assert gguf_kernels._compiled.get(key) not in (None, gguf_kernels._EAGER), \
        "the compiled kernel differed from the eager one and was dropped"
    return out.cpu()


def assert_bit_exact_or_fma(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    """Bit-exact is the target; values that differ only as a fused multiply-add can make them
    differ (``compiling.close_enough``) are reported as an expected failure, anything else fails."""
    same = out.view(torch.int16 if dtype != torch.float32 else torch.int32) == \
        ref.view(torch.int16 if dtype != torch.float32 else torch.int32)
    if bool(same.all()):
        return
    assert compiling.close_enough(out, ref, dtype), \
        f"{int((~same).sum())} of {same.numel()} values wrong, e.g. {out[~same][:4].tolist()} vs {ref[~same][:4].tolist()}"
    pytest.xfail(f"not bit-exact: {int((~same).sum())} of {same.numel()} values differ within FMA rounding")


@pytest.mark.parametrize("qtype", gguf_cases(), ids=lambda t: t.name)
def test_compiled_dequant_matches_gguf_py(compiled_dequant, qtype):
    """Against gguf-py's numpy dequantization (carried to the GPU machine as a wheel). Were it
    missing, our CPU kernels would be the reference: tests/test_gguf_dequant.py proves them
    bit-exact against gguf-py on every CI run."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, quants
    from gguf_writer_util import random_blocks

    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, per_row = 64, 512 // block
    rng = np.random.default_rng(200 + int(qtype))
    raw = random_blocks(qtype, rows * per_row, rng).reshape(rows, per_row * type_size)  # any finite scale
    ref = torch.from_numpy(quants.dequantize(raw, qtype).reshape(rows, per_row * block))
    out = compiled_result(torch.from_numpy(raw).to(DEV), int(qtype), per_row * block, torch.float32)
    assert_bit_exact_or_fma(out, ref, torch.float32)


@pytest.mark.parametrize("qname", ["Q4_K"])  # one more compile per type: the most used one
def test_compiled_dequant_half_output_is_the_reference_rounded_once(compiled_dequant, qname):
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, quants
    from gguf_writer_util import random_blocks

    qtype = T[qname]
    block, type_size = GGML_QUANT_SIZES[qtype]
    rows, per_row = 64, 512 // block
    raw = random_blocks(qtype, rows * per_row, np.random.default_rng(7), magnitude=0.5).reshape(rows, -1)
    ref = torch.from_numpy(quants.dequantize(raw, qtype).reshape(rows, -1)).to(torch.bfloat16)
    out = compiled_result(torch.from_numpy(raw).to(DEV), int(qtype), per_row * block, torch.bfloat16)
    assert_bit_exact_or_fma(out, ref, torch.bfloat16)


def test_dfloat11_compiled_decode_equals_eager(df11_models, monkeypatch):
    from qwenimage_pack.core.quant import dfloat11 as df11

    monkeypatch.setattr(df11, "_compiled", None)
    monkeypatch.setattr(df11, "_compile_failed", False)
    group = copy.deepcopy(df11_models[0].transformer_blocks[0].df11).to(DEV)
    eager = group.decode_flat(check=True)
    compiled = group.decode_flat(check=True, compiled=True)
    assert not df11._compile_failed, "torch.compile of the DFloat11 decoder failed: it decodes eagerly"
    assert torch.equal(compiled.view(torch.int16), eager.view(torch.int16))
