"""The Qwen2.5 tokenizer rebuilt from a llama.cpp GGUF's ``tokenizer.ggml.*`` metadata.

llama.cpp stores the byte-level BPE as two string arrays: every token in id order (the
vocab.json entries, then the added tokens as plain text, then ``[PAD<id>]`` fillers up to the
model's vocabulary size) and the merges as "a b" strings. ``tokenizer.ggml.token_type`` marks
added tokens as CONTROL (3) or USER_DEFINED (4). Those arrays stay unread in the file until
the first ``encode`` (see ``gguf_reader.LazyStringArray``).

Normalization and splitting are ``tokenizer.QwenTokenizer``'s, so a GGUF and a vocab.json +
merges.txt pair of the same vocabulary give the same ids.
"""
from __future__ import annotations

import threading
from typing import Any, Iterable, Mapping

from ..encoders.tokenizer import ADDED_TOKENS, PRETOKENIZE_PATTERN, QwenTokenizer
from ..errors import WeightFileError

_CONTROL, _USER_DEFINED = 3, 4
_BPE_MODELS = ("gpt2",)
# llama.cpp's name for the split pattern PRETOKENIZE_PATTERN implements.
_PRE_TOKENIZERS = ("qwen2",)


def _strings(value) -> list[str]:
    return value.read() if hasattr(value, "read") else list(value)


def has_tokenizer(metadata: Mapping[str, Any]) -> bool:
    return "tokenizer.ggml.tokens" in metadata and "tokenizer.ggml.merges" in metadata


def _check_kind(metadata: Mapping[str, Any], source: str) -> None:
    """The cheap header-level checks, so a wrong file fails when it is opened."""
    if not has_tokenizer(metadata):
        raise WeightFileError(source, "carries no tokenizer (tokenizer.ggml.tokens / merges).",
                              "a GGUF with an embedded tokenizer, or a Qwen2.5 tokenizer folder")
    model = metadata.get("tokenizer.ggml.model", "gpt2")
    if model not in _BPE_MODELS:
        raise WeightFileError(source, f"has a {model!r} tokenizer.", "Qwen2.5's byte-level BPE ('gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "qwen2")
    if pre not in _PRE_TOKENIZERS:
        raise WeightFileError(source, f"has tokenizer pre-processing {pre!r}.", "Qwen2's ('qwen2')")


def build_tokenizer(metadata: Mapping[str, Any], source: str = "<gguf>") -> QwenTokenizer:
    """Read the token arrays now and build the tokenizer (~1 s for the full vocabulary)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    _check_kind(metadata, source)
    tokens = _strings(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in _strings(metadata["tokenizer.ggml.merges"])]
    types = metadata.get("tokenizer.ggml.token_type")
    if types is not None:
        added = [(i, tokens[i], int(t) == _CONTROL) for i, t in enumerate(types) if int(t) in (_CONTROL, _USER_DEFINED)]
    else:
        # Old conversions without types: the added tokens Qwen2.5 is known to have.
        known = {content: is_special for _, content, is_special in ADDED_TOKENS}
        added = [(i, tok, known[tok]) for i, tok in enumerate(tokens) if tok in known]

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Added tokens are matched in the raw text before BPE; their ids are already in the vocab.
    tok.add_tokens([AddedToken(content, special=is_special, normalized=False) for _, content, is_special in added])
    for i, content, _ in added:
        if tok.token_to_id(content) != i:
            raise WeightFileError(source, f"token {content!r} appears twice in the token list.",
                                  "each added token once")
    return QwenTokenizer(tok, source)


class GGUFTokenizer:
    """``QwenTokenizer`` interface over GGUF metadata, built on first use (thread-safe)."""

    def __init__(self, metadata: Mapping[str, Any], source: str = "<gguf>"):
        _check_kind(metadata, source)
        self._metadata = metadata
        self.source = source
        self._built: QwenTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> QwenTokenizer:
        if self._built is None:
            with self._lock:
                if self._built is None:
                    self._built = build_tokenizer(self._metadata, self.source)
                    self._metadata = None  # the arrays are no longer needed
        return self._built

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def __len__(self) -> int:
        return len(self.tokenizer)


def tokenizer_from_gguf(source) -> GGUFTokenizer:
    """The tokenizer embedded in a GGUF: ``source`` is its path, a ``GGUFContents`` or its
    metadata. Only the header is read now (~0.1 s); the vocabulary on first use."""
    from ..formats.gguf import read_header

    if isinstance(source, Mapping):
        return GGUFTokenizer(source)
    metadata = getattr(source, "metadata", None)
    if metadata is not None:
        return GGUFTokenizer(metadata, getattr(source, "path", "") or "<gguf>")
    header = read_header(source)
    return GGUFTokenizer(header.metadata, header.path)
