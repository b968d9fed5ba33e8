"""DFloat11 (core/quant/dfloat11.py) against upstream's own encoder, on the CPU.

Groups are compressed with ``dfloat11_utils`` from the ``dfloat11`` package exactly as
``compress_model`` does (codec, 32-bit length limit, tables, bitstream) and decoded by ours, bit
for bit. The module is loaded by path: the package's ``__init__`` imports cupy and loads a PTX
kernel. Blocks with a group attached must compute exactly what they computed with the bf16
weights, and hold no decoded weight outside their forward.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import sys
import warnings
from pathlib import Path

import pytest
import torch

import references as refs
from qwenimage_pack.core.quant import dfloat11 as df11
from qwenimage_pack.core.models.mmdit import MMDiTConfig, QwenImageMMDiT, TransformerBlock
from qwenimage_pack.core.pipeline import compile as block_compile
from qwenimage_pack.core.pipeline import streaming

pytest.importorskip("dahuffman")
pytest.importorskip("tqdm")
pytest.importorskip("numpy")

# config.json dfloat11_config.pattern_dict of DFloat11/Qwen-Image-Edit-DF11: the concatenation order
QWEN_PATTERN = ["img_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj",
                "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2",
                "txt_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


def _load_encoder():
    spec = importlib.util.find_spec("dfloat11")  # finds the folder without running __init__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the dfloat11 package is not installed", allow_module_level=True)
    path = Path(list(spec.submodule_search_locations)[0]) / "dfloat11_utils.py"
    spec = importlib.util.spec_from_file_location("dfloat11_utils_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


enc = _load_encoder()


@pytest.fixture(autouse=True)
def one_thread():
    # With 2 threads, fancy indexing in this sandbox slows down 10-100x (notes/dfloat11.md).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def compress(weights: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The six tensors compress_model registers on a block for ``weights`` (pattern order)."""
    flat = [w.detach().contiguous().flatten() for w in weights]
    assert all(w.dtype == torch.bfloat16 for w in flat)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the encoder prints its tables and wraps read-only numpy arrays
        _, counter = enc.get_codec(torch.cat(flat))
        codec, _, table = enc.get_32bit_codec(counter)
        luts = enc.get_luts(table)
        stream, sign_mantissa, positions, gaps, split = enc.encode_weights(flat, codec, 8, 512)
    return dict(luts=luts, encoded_exponent=stream, sign_mantissa=sign_mantissa,
                output_positions=positions.view(torch.uint8), gaps=gaps, split_positions=split)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def _same(decoded, weights) -> bool:
    return len(decoded) == len(weights) and all(
        d.shape == w.shape and d.dtype == torch.bfloat16 and torch.equal(_bits(d), _bits(w))
        for d, w in zip(decoded, weights))


def _block_weights(seed: int = 0) -> tuple[list[tuple[str, tuple[int, ...]]], list[torch.Tensor]]:
    """The 14 compressed weights of a tiny MMDiT block, with mixed scales and special values."""
    block = TransformerBlock(64, 2, 32, device="meta")
    layout = df11.layout_of(block, QWEN_PATTERN)
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(s, generator=g) * 0.02 * 4.0 ** (i % 3 - 1)).to(torch.bfloat16)
               for i, (_, s) in enumerate(layout)]
    special = torch.tensor([0.0, -0.0, 1e-39, -3e-40, 9e-41, 1e30, -2.0, 1e-20])  # zeros, subnormals, extremes
    weights[1].view(-1)[: len(special)] = special.to(torch.bfloat16)
    weights[-1].view(-1)[-3:] = 0.0
    return layout, weights


# -- decoding -------------------------------------------------------------------------------


def test_block_group_is_bit_exact():
    layout, weights = _block_weights()
    tensors = compress(weights)
    group = df11.DF11Group(tensors, layout)
    assert tensors["luts"].shape[0] > 2  # several decode tables
    assert len(torch.unique((torch.cat([_bits(w).flatten() for w in weights]) >> 7) & 0xFF)) > 10
    assert _same(group.decode(check=True), weights)
    assert _same(group.decode(), weights)  # no check: the same values
    assert group.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    f32 = group.decode(torch.float32)
    assert all(a.dtype == torch.float32 and torch.equal(a, w.float()) for a, w in zip(f32, weights))


@pytest.mark.parametrize("chunk_threads", [512, 1536, df11.CHUNK_THREADS])
def test_many_thread_blocks_in_chunks(chunk_threads):
    g = torch.Generator().manual_seed(1)
    weights = [(torch.randn(150_000, generator=g) * 0.02).to(torch.bfloat16),
               (torch.randn(300, 170, generator=g) * 0.3).to(torch.bfloat16)]
    group = df11.DF11Group(compress(weights), [("a", (150_000,)), ("b", (300, 170))], chunk_threads=chunk_threads)
    assert group.n_blocks > 8  # chunks of 1 and 3 thread blocks, the last one padded
    assert _same(group.decode(check=True), weights)


def test_long_codes_use_all_four_table_levels():
    # Fibonacci frequencies give the most skewed Huffman code: lengths up to 25 bits.
    fib = [1, 1]
    while len(fib) < 26:
        fib.append(fib[-1] + fib[-2])
    exponents = torch.cat([torch.full((f,), 100 + i) for i, f in enumerate(fib)])
    g = torch.Generator().manual_seed(2)
    exponents = exponents[torch.randperm(len(exponents), generator=g)]
    low = torch.randint(0, 256, (len(exponents),), generator=g)  # sign and mantissa
    v = (low & 0x80) << 8 | exponents << 7 | (low & 0x7F)
    w = torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16).view(torch.bfloat16)
    tensors = compress([w])
    assert int(tensors["luts"][-1].max()) > 24
    group = df11.DF11Group(tensors, [("w", (len(w),))])
    assert _same(group.decode(check=True), [w])


def test_decoder_traces_as_one_graph(monkeypatch):
    layout, weights = _block_weights(3)
    group = df11.DF11Group(compress(weights), layout)
    monkeypatch.setattr(df11, "_compiled", torch.compile(df11.decode_chunk, backend="aot_eager", fullgraph=True,
                                                         dynamic=False))
    assert _same(group.decode(check=True, compiled=True), weights)


def test_a_failing_compiler_falls_back_to_eager(monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("no compiler here")

    layout, weights = _block_weights(4)
    group = df11.DF11Group(compress(weights), layout)
    monkeypatch.setattr(df11, "_compiled", broken)
    monkeypatch.setattr(df11, "_compile_failed", False)
    assert _same(group.decode(compiled=True), weights)
    assert df11._compile_failed and "decoding eagerly" in caplog.text


# -- malformed groups -----------------------------------------------------------------------


def _tamper(t: dict, name: str, fn) -> dict:
    t = {k: v.clone() for k, v in t.items()}
    t[name] = fn(t[name])
    return t


def _set(t: torch.Tensor, index, value) -> torch.Tensor:
    t[index] = value
    return t


def _drop_symbol(luts: torch.Tensor) -> torch.Tensor:
    lens = luts[-1].to(torch.int64)
    longest, other = int(lens.argmax()), int(torch.nonzero(lens).flatten()[0])
    tables = luts[:-1]
    tables[tables == longest] = other
    return luts


MALFORMED = {
    "pointer to a missing table": ("luts", lambda t: _set(t, (0, 0), 256 - (t.shape[0] - 1)), "pointer names"),
    "code longer than 32 bits": ("luts", lambda t: _set(t, (-1, int(t[-1].argmax())), 33), "code length 33"),
    "code for an infinite exponent": ("luts", lambda t: _set(t, (-1, 250), 3), "exponents >= 240"),
    "not a prefix code": ("luts", lambda t: _set(t, (-1, slice(0, 100)), 1), "prefix code"),
    "table entry without a length": ("luts", lambda t: _set(t, (0, 0), 5), "no code length"),
    "length without a table entry": ("luts", _drop_symbol, "no table entry"),
    "too many tables": ("luts", lambda t: torch.zeros(19, 256, dtype=torch.uint8), "luts must be uint8"),
    "positions not ending at n": ("output_positions",
                                  lambda t: torch.tensor([0, 5], dtype=torch.int32).view(torch.uint8), "rise from 0"),
    "positions of the wrong length": ("output_positions", lambda t: t[:4], "rise from 0"),
    "positions not in whole uint32": ("output_positions", lambda t: t[:-1], "whole uint32"),
    "gaps too short": ("gaps", lambda t: t[:-8], "gaps"),
    "split positions": ("split_positions", lambda t: t + 1, "split_positions"),
    "sign_mantissa dtype": ("sign_mantissa", lambda t: t.to(torch.int16), "sign_mantissa must be"),
    "values missing": ("sign_mantissa", lambda t: t[:-1], "sign_mantissa holds"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_groups_are_refused(case):
    layout, weights = _block_weights(5)
    name, fn, message = MALFORMED[case]
    with pytest.raises(ValueError, match=message):
        df11.DF11Group(_tamper(compress(weights), name, fn), layout)


def test_refused_layouts_and_settings():
    layout, weights = _block_weights(6)
    t = compress(weights)
    with pytest.raises(ValueError, match="hold"):
        df11.DF11Group(t, layout[:-1])
    with pytest.raises(ValueError, match="lacks gaps"):
        df11.DF11Group({k: v for k, v in t.items() if k != "gaps"}, layout)
    with pytest.raises(ValueError, match="bytes_per_thread"):
        df11.DF11Group(t, layout, bytes_per_thread=4)


def test_corrupt_streams_fail_the_decode_check():
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(120_000, generator=g) * 0.02).to(torch.bfloat16)
    t = compress([w])
    layout = [("w", (len(w),))]
    gaps = _tamper(t, "gaps", lambda x: _set(x, slice(0, 64), x[:64] ^ 0x5A))
    positions = _tamper(t, "output_positions", lambda x: _set(x.view(torch.int32), 3, x.view(torch.int32)[3] + 1)
                        .view(torch.uint8))
    stream = _tamper(t, "encoded_exponent", lambda x: _set(x, slice(100, 4000), 0xFF))
    for bad in (gaps, positions, stream):
        group = df11.DF11Group(bad, layout)  # structurally fine
        with pytest.raises(ValueError, match="does not decode to its output_positions"):
            group.decode(check=True)


# -- blocks that decode per forward ---------------------------------------------------------


def _model():
    model = QwenImageMMDiT(MMDiTConfig(**refs.TINY_MMDIT), dtype=torch.bfloat16).eval()
    model.load_state_dict(refs.tiny_mmdit_bf16_state(seed=8))
    return model


def _inputs():
    g = torch.Generator().manual_seed(9)
    return (torch.randn(1, 16, 8, 8, generator=g).to(torch.bfloat16), torch.tensor([0.4]),
            torch.randn(1, 5, 48, generator=g).to(torch.bfloat16))


def _compressed(model):
    model = copy.deepcopy(model)
    for block in model.transformer_blocks:
        layout = df11.layout_of(block, QWEN_PATTERN)
        group = df11.DF11Group(compress([block.get_submodule(n).weight for n, _ in layout]), layout)
        df11.attach(block, group)
    return model


@pytest.fixture(scope="module")
def models():
    model = _model()
    with torch.no_grad():
        ref = model(*_inputs())
    return model, _compressed(model), ref


def _placeholders(block) -> bool:
    layers = [block.get_submodule(n) for n in QWEN_PATTERN]
    return all(m.weight.device.type == "meta" and "weight" not in m._parameters for m in layers)


def test_attached_blocks_compute_the_same_and_release_the_weights(models):
    plain, model, ref = models
    seen = []
    layer = model.transformer_blocks[1].attn.to_q
    handle = layer.register_forward_pre_hook(lambda m, a: seen.append(m.weight))
    try:
        with torch.no_grad():
            out, again = model(*_inputs()), model(*_inputs())
    finally:
        handle.remove()
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert torch.equal(_bits(seen[0]), _bits(plain.transformer_blocks[1].attn.to_q.weight))
    assert all(_placeholders(b) and b.df11.verified for b in model.transformer_blocks)
    sd = model.state_dict()
    assert "transformer_blocks.0.df11.encoded_exponent" in sd and "transformer_blocks.0.attn.to_q.bias" in sd
    assert "transformer_blocks.0.attn.to_q.weight" not in sd
    block = model.transformer_blocks[0]
    assert streaming.block_bytes(block) == block.df11.nbytes + sum(p.numel() * 2 for p in block.parameters())
    assert streaming.block_bytes(block) < streaming.block_bytes(plain.transformer_blocks[0])


def test_attached_blocks_stream(models):
    _, model, ref = models
    model = copy.deepcopy(model)
    with streaming.BlockStreamer(model.transformer_blocks, "cpu", "cpu", prefetch=1), torch.no_grad():
        out = model(*_inputs())
    assert torch.equal(out, ref)
    assert all(_placeholders(b) for b in model.transformer_blocks)


def test_attached_blocks_compile(models):
    _, model, ref = models
    model = copy.deepcopy(model)
    block_compile.reset()
    try:
        with block_compile.compiled(model, block_compile.CompileSettings("eager")) as on, torch.no_grad():
            assert on
            out = model(*_inputs())
        assert block_compile.failure(block_compile.CompileSettings("eager")) is None
    finally:
        block_compile.reset()
    assert torch.equal(out, ref)


def test_weights_are_released_when_the_forward_fails(models):
    _, model, _ = models
    block = copy.deepcopy(model.transformer_blocks[0])
    img = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(Exception), torch.no_grad():
        block(img, img, None, None, [slice(None)], None, None, torch.bfloat16)  # no modulation input
    assert _placeholders(block)


def test_detach_restores_plain_parameters(models):
    plain, model, ref = models
    model = copy.deepcopy(model)
    for block in model.transformer_blocks:
        df11.detach(block)
    for a, b in zip(model.transformer_blocks, plain.transformer_blocks):
        assert "df11" not in a._modules and not a._forward_pre_hooks and not a._forward_hooks
        assert all(torch.equal(_bits(a.get_submodule(n).weight), _bits(b.get_submodule(n).weight))
                   and isinstance(a.get_submodule(n).weight, torch.nn.Parameter) for n in QWEN_PATTERN)
    with torch.no_grad():
        assert torch.equal(model(*_inputs()), ref)


def test_attach_refuses_mismatched_blocks():
    layout, weights = _block_weights(10)
    t = compress(weights)
    block = TransformerBlock(64, 2, 32, dtype=torch.bfloat16)
    (name, (rows, cols)), rest = layout[0], layout[1:]
    with pytest.raises(ValueError, match="should be"):  # transposed: same size, other shape
        df11.attach(block, df11.DF11Group(t, [(name, (cols, rows))] + rest))
    with pytest.raises(ValueError, match="lacks"):
        df11.attach(block, df11.DF11Group(t, [("attn.to_x", (rows, cols))] + rest))
    assert "weight" in block.attn.to_q._parameters  # nothing changed by a refused attach
    df11.attach(block, df11.DF11Group(t, layout))
    with pytest.raises(ValueError, match="already"):
        df11.attach(block, df11.DF11Group(t, layout))


def test_a_stream_whose_last_code_crosses_into_the_last_block_decodes():
    """The encoder writes a thread block's first output position only where a code starts in it.
    Exponent counts chosen so the stream is 4097 bytes (two 256-thread blocks), the single 9-bit
    code comes last, starts in block 0 and ends on the stream's last byte: the file then holds
    [0, n] (no entry of its own for block 1). The dfloat11 kernel decodes it; so must we."""
    counts = {120: 15349, 121: 4000, 119: 2000, 118: 500, 117: 202, 116: 50, 115: 12, 114: 3, 113: 1}
    seq = [k for k, c in counts.items() if k != 113 for _ in range(c)]
    g = torch.Generator().manual_seed(0)
    exps = torch.cat([torch.tensor(seq)[torch.randperm(len(seq), generator=g)], torch.tensor([113])])
    low = torch.randint(0, 256, (len(exps),), generator=g)
    bits = (low & 0x80) << 8 | exps << 7 | (low & 0x7F)
    w = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16).view(torch.bfloat16)
    t = compress([w])
    assert t["encoded_exponent"].numel() == 4097  # two thread blocks of 256 x 8 bytes
    assert df11.positions(t["output_positions"]).tolist() == [0, w.numel()]  # one entry short
    group = df11.DF11Group(t, [("w", (w.numel(),))])
    assert torch.equal(group.decode_flat(check=True).view(torch.int16), w.view(torch.int16))
