"""Speed options travel with the call (RunOptions), not through process-wide switches.

Two models in one process (two workflows, a ControlNet or text encoder running inside the
MMDiT's step) must each run with their own options: a handle's Speed Options reach only that
handle's MMDiT calls; every other call gets the defaults. Recorded here is what each call
*requested* (on a CPU the cuDNN / float8 paths fall back to SDPA / dequantizing anyway).
"""
from __future__ import annotations

import threading

import pytest
import torch

import references as refs
from qwenimage_pack.core.layers import attention
from qwenimage_pack.core.quant import fp8_matmul
from qwenimage_pack.core.models import mmdit
from qwenimage_pack.core.pipeline import compile as block_compile
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT
from qwenimage_pack.core.layers.run_options import DEFAULT, RunOptions
from qwenimage_pack.core.quant import gguf_dequant as dequant
from qwenimage_pack.core.layers.linear import Linear
from qwenimage_pack.nodes import options, sampling
from qwenimage_pack.nodes.handles import DiffusionModel

E4M3 = getattr(torch, "float8_e4m3fn", None)


def _tiny(seed: int, fp8: bool = False) -> QwenImageMMDiT:
    torch.manual_seed(seed)
    module = QwenImageMMDiT(MMDiTConfig(**refs.TINY_MMDIT)).eval()
    if fp8:  # float8 block weights, so the fp8 matmul option has layers to act on
        refs.fp8_block_weights(module)
    return module


def _handle(module, fmt="float32"):
    return DiffusionModel(module=module, name="tiny.safetensors", variant="qwen-image", weight_format=fmt)


class _Recorder:
    """Replaces the attention function the MMDiT calls and the float8 matmul entry point; records
    (who, requested backend) and (who, requested fp8 mode). ``who`` is the caller's label."""

    def __init__(self, monkeypatch, label):
        self.attn: list[tuple[str, str | None]] = []
        self.fp8: list[tuple[str, str | None]] = []
        self.label = label
        real = attention.attention

        def record_attention(q, k, v, mask=None, backend=None):
            self.attn.append((label(), backend))
            return real(q, k, v, mask)

        def record_fp8(x, w, w_scale, bias, mode=None, *args, **kwargs):
            self.fp8.append((label(), mode))
            return None  # the caller dequantizes: exact

        monkeypatch.setattr(mmdit, "attention", record_attention)
        monkeypatch.setattr(fp8_matmul, "try_linear", record_fp8)

    def backends(self, who):
        return {b for w, b in self.attn if w == who}

    def fp8_modes(self, who):
        return [m for w, m in self.fp8 if w == who]


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 8, 8, generator=g), torch.tensor([0.6]), torch.randn(1, 5, 48, generator=g)


@pytest.mark.skipif(E4M3 is None, reason="torch without float8")
def test_a_model_run_inside_another_handles_step_gets_the_defaults(monkeypatch):
    """Handle A (cuDNN attention, row-scaled fp8) samples; inside its step another model B (a
    ControlNet, a text encoder: here a second MMDiT sharing nothing) runs without options.
    B must see the defaults; A its own options, before and after B ran."""
    stack = ["A"]
    rec = _Recorder(monkeypatch, lambda: stack[-1])
    a, b = _tiny(0, fp8=True), _tiny(1, fp8=True)

    def run_b_inside(_module, _args):
        stack.append("B")
        try:
            b(*_inputs(2))
        finally:
            stack.pop()

    a.transformer_blocks[1].register_forward_pre_hook(run_b_inside)  # between A's two blocks
    fast = options.with_speed_options(_handle(a, "fp8_e4m3fn"), "cudnn", "row")
    positive = [[torch.randn(1, 5, 48, generator=torch.Generator().manual_seed(4)), {}]]
    sampling.sample(fast, positive, {"samples": torch.zeros(1, 16, 8, 8)}, seed=3, steps=1, cfg=1.0, device="cpu")

    assert rec.backends("A") == {"cudnn"}
    assert rec.backends("B") == {DEFAULT.attention}
    # A's float8 block layers asked for row scaling on both sides of B's run (6 per block, 2 blocks, ...)
    assert rec.fp8_modes("A") and set(rec.fp8_modes("A")) == {"row"}
    assert rec.fp8_modes("B") == ([] if DEFAULT.fp8_matmul is None else [DEFAULT.fp8_matmul] * len(rec.fp8_modes("B")))
    # and nothing is left switched for whoever runs next
    stack[:] = ["after"]
    with torch.inference_mode():
        a(*_inputs(2))
    assert rec.backends("after") == {DEFAULT.attention}
    assert rec.fp8_modes("after") == rec.fp8_modes("B")


def test_two_handles_sampling_at_once_each_use_their_own_options(monkeypatch):
    """Two threads, each inside its handle's speed settings and both inside a forward at the same
    time (barriers): each call runs with its own handle's options."""
    rec = _Recorder(monkeypatch, lambda: threading.current_thread().name)
    fast = options.with_speed_options(_handle(_tiny(0)), "cudnn", "off")
    plain = _handle(_tiny(1))
    both_inside = threading.Barrier(2, timeout=30)

    def meet(*_):
        both_inside.wait()  # returns None: the block's arguments stay as they are

    for h in (fast, plain):
        h.module.transformer_blocks[0].register_forward_pre_hook(meet)
    errors = []

    def run(handle):
        try:
            with torch.inference_mode(), options.speed_settings(handle, torch.device("cpu")) as run_options:
                handle.module(*_inputs(5), options=run_options)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(h,), name=n) for h, n in ((fast, "fast"), (plain, "plain"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert rec.backends("fast") == {"cudnn"} and rec.backends("plain") == {DEFAULT.attention}


def test_run_options_for_a_handle():
    base = _handle(torch.nn.Linear(2, 2), "fp8_e4m3fn")
    assert options.run_options(base) == DEFAULT  # no Speed Options: the defaults, environment included
    assert options.run_options(options.with_speed_options(base, "cudnn", "tensor")) == \
        RunOptions(attention="cudnn", fp8_matmul="tensor")
    # "off" is an explicit choice: it overrides a QWENIMAGE_FP8_MATMUL=1 default
    assert options.run_options(options.with_speed_options(base, "sdpa", "off")).fp8_matmul is None
    with pytest.raises(ValueError, match="attention"):
        RunOptions(attention="xformers")
    with pytest.raises(ValueError, match="fp8"):
        RunOptions(fp8_matmul="fast")


def test_environment_switches_are_read_once(monkeypatch):
    """QWENIMAGE_FP8_MATMUL / _MODE / QWENIMAGE_FP8_COMPILE give the defaults when the pack loads;
    changing the environment later changes nothing (nothing reads it per call)."""
    before = RunOptions()
    monkeypatch.setenv("QWENIMAGE_FP8_MATMUL", "0" if before.fp8_matmul else "1")
    monkeypatch.setenv("QWENIMAGE_FP8_COMPILE", "0" if before.fp8_compile else "1")
    assert RunOptions() == before == DEFAULT
    x = torch.randn(4, 32).to(torch.bfloat16)
    monkeypatch.setattr(fp8_matmul, "_COMPILE_ON", ("cpu",))
    compiled = []
    monkeypatch.setattr(fp8_matmul, "_compiled", lambda mode: compiled.append(mode) or fp8_matmul.quantize_activation)
    fp8_matmul.quantize(x, "row", compiled=False)
    assert compiled == []
    fp8_matmul.quantize(x, "row", compiled=True)
    assert compiled == ["row"]


def test_compiled_blocks_leave_the_fused_dequant_registry_alone(monkeypatch):
    """The compiled blocks trace the plain GGUF kernels through their own call's options, instead
    of unregistering the fused kernels for the whole process while they run."""
    gguf = pytest.importorskip("gguf")
    module = _tiny(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, lin in module.transformer_blocks.named_modules():
        if isinstance(lin, Linear) and "mlp" in name:
            w = lin.weight.detach()
            lin.set_quantized(torch.from_numpy(gguf.quants.quantize(w.numpy(), q8)), int(q8), tuple(w.shape))
    fused_calls = []

    def fake_fused(blocks, qtype, cols, dtype):
        fused_calls.append(tuple(blocks.shape))
        return torch.empty(blocks.shape[0], cols, dtype=dtype, device=blocks.device)

    monkeypatch.setitem(dequant._FUSED, int(q8), fake_fused)
    seen = []
    block_compile.reset()
    try:
        with torch.inference_mode(), block_compile.compiled(module, block_compile.CompileSettings("eager")):
            module(*_inputs(1), control=lambda i, img: seen.append(dequant._FUSED.get(int(q8)) is fake_fused))
    finally:
        block_compile.reset()
    assert seen == [True, True]  # registered all along: another model dequantizing meanwhile keeps it
    meta = torch.empty(4, 34, dtype=torch.uint8, device="meta")  # not a CPU tensor: the fused route applies
    dequant.dequantize(meta, int(q8), 32, fused=False)
    assert fused_calls == []  # a call that asks for the plain kernels gets them
    dequant.dequantize(meta, int(q8), 32)
    assert fused_calls == [(4, 34)]
