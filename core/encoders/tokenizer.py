"""Qwen2.5 tokenizer, Qwen-Image prompt templates and tokenizer discovery.

The templates and the number of leading tokens dropped from the encoder output are those of
diffusers' Qwen-Image pipelines; the tokenizer reproduces transformers' ``Qwen2Tokenizer``
built from the same vocab.json + merges.txt (or tokenizer.json).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..errors import WeightFileError

# ---------------------------------------------------------------------------------------
# Templates

_EDIT_SYSTEM = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
)
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
PICTURE_TEMPLATE = "Picture {}: " + IMAGE_PLACEHOLDER

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\n" + _EDIT_SYSTEM + "<|im_end|>\n<|im_start|>user\n" + IMAGE_PLACEHOLDER
    + "{}<|im_end|>\n<|im_start|>assistant\n"
)
# Edit-Plus (2509 / 2511): one "Picture N: ..." placeholder per input image precedes the prompt.
EDIT_PLUS_TEMPLATE = "<|im_start|>system\n" + _EDIT_SYSTEM + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

# Leading tokens (system turn + "<|im_start|>user\n") cut from the encoder output.
T2I_DROP = 34
EDIT_DROP = 64
# "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n": always kept after the user text.
TAIL_TOKENS = 5

KINDS = ("t2i", "edit", "edit_plus")

# ---------------------------------------------------------------------------------------
# Token ids

ENDOFTEXT_ID = 151643  # also the padding token
IM_START_ID = 151644
IM_END_ID = 151645
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655

# The tokens Qwen2.5 adds after its 151643-entry BPE vocabulary, in id order, with their
# "special" flag; vocab.json does not contain them, so they are added when only
# vocab.json + merges.txt are present.
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (151643 + i, content, special)
    for i, (content, special) in enumerate(
        [
            ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
            ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
            ("<|box_start|>", True), ("<|box_end|>", True),
            ("<|quad_start|>", True), ("<|quad_end|>", True),
            ("<|vision_start|>", True), ("<|vision_end|>", True),
            ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
            ("<tool_call>", False), ("</tool_call>", False),
            ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
            ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
            ("<|img|>", True), ("<|endofimg|>", True), ("<|meta|>", True), ("<|endofmeta|>", True),
        ]
    )
)
_REQUIRED_IDS = {
    "<|endoftext|>": ENDOFTEXT_ID,
    "<|im_start|>": IM_START_ID,
    "<|im_end|>": IM_END_ID,
    "<|vision_start|>": VISION_START_ID,
    "<|vision_end|>": VISION_END_ID,
    "<|image_pad|>": IMAGE_PAD_ID,
}

# Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newline runs, and whitespace not followed by a word.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_prompt(kind: str, prompt: str, n_images: int = 0) -> tuple[str, int]:
    """The full encoder input for a prompt, and how many leading tokens to drop.

    ``kind``: "t2i" (no images), "edit" (the original Edit model: exactly one image slot,
    always present in its template) or "edit_plus" (2509 / 2511: ``n_images`` "Picture N:"
    slots, none when ``n_images`` is 0).
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    if kind == "t2i":
        if n_images:
            raise ValueError("the text-to-image template has no image slots; use kind 'edit' or 'edit_plus'")
        return T2I_TEMPLATE.format(prompt), T2I_DROP
    if kind == "edit":
        if n_images > 1:
            raise ValueError(f"the Edit template holds one image, got {n_images}; use kind 'edit_plus' for several")
        return EDIT_TEMPLATE.format(prompt), EDIT_DROP
    if kind == "edit_plus":
        slots = "".join(PICTURE_TEMPLATE.format(i + 1) for i in range(n_images))
        return EDIT_PLUS_TEMPLATE.format(slots + prompt), EDIT_DROP
    raise ValueError(f"unknown prompt kind {kind!r}; expected one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------
# Tokenizer


class QwenTokenizer:
    """Byte-level BPE with NFC normalization and Qwen2's split pattern (the ``tokenizers``
    package does the work); special tokens always encode to their single ids."""

    def __init__(self, tokenizer, source: str | None = None):
        """``tokenizer``: a ``tokenizers.Tokenizer`` already set up, or a folder (see ``from_dir``)."""
        if isinstance(tokenizer, (str, os.PathLike)):
            loaded = self.from_dir(tokenizer)
            tokenizer, source = loaded._tok, source or loaded.source
        self._tok = tokenizer
        self.source = source or "<memory>"
        for content, expected in _REQUIRED_IDS.items():
            got = tokenizer.token_to_id(content)
            if got != expected:
                raise WeightFileError(
                    source, f"token {content} has id {got}.", f"id {expected} (the Qwen2.5 vocabulary)"
                )

    @classmethod
    def from_dir(cls, directory) -> "QwenTokenizer":
        """Load tokenizer.json if present, else vocab.json + merges.txt (+ tokenizer_config.json)."""
        from tokenizers import Tokenizer

        d = Path(directory)
        if (d / "tokenizer.json").is_file():
            try:
                tok = Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # the tokenizers error says which part is wrong
                raise WeightFileError(d / "tokenizer.json", f"cannot be read as a tokenizer ({e}).") from None
            _add_tokens(tok, ADDED_TOKENS, d)
            return cls(tok, str(d))
        vocab, merges = d / "vocab.json", d / "merges.txt"
        missing = [p.name for p in (vocab, merges) if not p.is_file()]
        if missing:
            raise WeightFileError(d, f"no tokenizer.json and missing {', '.join(missing)}.",
                                  "vocab.json + merges.txt or tokenizer.json")
        return cls(_build_bpe(vocab, merges, _added_tokens_from_config(d / "tokenizer_config.json")), str(d))

    @classmethod
    def from_vocab_merges(cls, vocab: Mapping[str, int], merges: Sequence, source: str = "<memory>") -> "QwenTokenizer":
        """From an in-memory vocabulary (e.g. GGUF metadata); ``merges`` as "a b" strings or pairs.
        Tokens already in ``vocab`` (as in a GGUF token list) keep their ids."""
        from tokenizers import Tokenizer
        from tokenizers.models import BPE

        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        tok = Tokenizer(BPE(vocab=dict(vocab), merges=pairs, **_BPE_OPTIONS))
        _configure(tok)
        _add_tokens(tok, ADDED_TOKENS, source)
        return cls(tok, source)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


_BPE_OPTIONS = dict(
    dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
    fuse_unk=False, byte_fallback=False,
)


def _configure(tok) -> None:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()


def _build_bpe(vocab: Path, merges: Path, added: Sequence[tuple[int, str, bool]]):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    try:
        model = BPE.from_file(str(vocab), str(merges), **_BPE_OPTIONS)
    except Exception as e:
        raise WeightFileError(vocab.parent, f"vocab.json / merges.txt cannot be read ({e}).") from None
    tok = Tokenizer(model)
    _configure(tok)
    _add_tokens(tok, added, vocab.parent)
    return tok


def _added_tokens_from_config(path: Path) -> tuple[tuple[int, str, bool], ...]:
    """The added tokens a tokenizer_config.json declares, else the Qwen2.5 defaults."""
    if not path.is_file():
        return ADDED_TOKENS
    try:
        decoder = json.loads(path.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
        listed = sorted((int(i), t["content"], bool(t.get("special", True))) for i, t in decoder.items())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightFileError(path, f"added_tokens_decoder cannot be read ({e}).") from None
    return tuple(listed) or ADDED_TOKENS


def _add_tokens(tok, added: Sequence[tuple[int, str, bool]], source) -> None:
    """Add tokens in id order; the library numbers new ones from the current size, so a gap
    in the ids would silently shift every later token and is refused instead."""
    from tokenizers import AddedToken

    for token_id, content, special in sorted(added):
        existing = tok.token_to_id(content)
        if existing is None:
            size = tok.get_vocab_size(with_added_tokens=True)
            if size != token_id:
                raise WeightFileError(source, f"token {content} would get id {size}.", f"id {token_id}")
        elif existing != token_id:
            raise WeightFileError(source, f"token {content} has id {existing}.", f"id {token_id}")
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])


# ---------------------------------------------------------------------------------------
# Discovery

TOKENIZER_ENV = "QWENIMAGE_TOKENIZER_DIR"


class TokenizerNotFoundError(WeightFileError, FileNotFoundError):
    """No tokenizer folder anywhere; callers may catch it as either base."""


def _is_tokenizer_dir(d: Path) -> bool:
    return d.is_dir() and ((d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file()))


def tokenizer_search_dirs(text_encoder_path=None, extra_dirs: Iterable = ()) -> list[Path]:
    """Where ``find_tokenizer_dir`` looks, most specific first: $QWENIMAGE_TOKENIZER_DIR (an
    explicit choice), then next to the text encoder, then ``extra_dirs`` (fallbacks such as
    the copy ComfyUI bundles)."""
    dirs: list[Path] = []
    env = os.environ.get(TOKENIZER_ENV)
    if env:
        dirs.append(Path(env))
    if text_encoder_path is not None:
        p = Path(text_encoder_path)
        base = p if p.is_dir() else p.parent
        # A Hugging Face repo keeps vocab.json beside the weights; a diffusers folder keeps
        # it in tokenizer/ beside text_encoder/.
        dirs += [base / "qwen25_tokenizer", base / "tokenizer", base]
        if base.name == "text_encoder":
            dirs.append(base.parent / "tokenizer")
    dirs += [Path(d) for d in extra_dirs]
    return dirs


def find_tokenizer_dir(text_encoder_path=None, extra_dirs: Iterable = ()) -> Path:
    """The first folder holding a Qwen2.5 tokenizer (vocab.json + merges.txt, or tokenizer.json)."""
    dirs = tokenizer_search_dirs(text_encoder_path, extra_dirs)
    for d in dirs:
        if _is_tokenizer_dir(d):
            return d
    looked = "\n  ".join(str(d) for d in dirs) or "(nowhere: no text encoder path, no extra folders, no $" + TOKENIZER_ENV + ")"
    raise TokenizerNotFoundError(
        text_encoder_path if text_encoder_path is not None else "Qwen2.5 tokenizer",
        f"no Qwen2.5 tokenizer found. Looked in:\n  {looked}\n",
        f"a folder with vocab.json + merges.txt (or tokenizer.json); put one next to the text encoder "
        f"as qwen25_tokenizer/, or set ${TOKENIZER_ENV}",
    )


# ---------------------------------------------------------------------------------------
# Prompt -> ids


def encode_prompt_ids(tokenizer, prompt: str, kind: str = "t2i", max_tokens: int = 1024,
                      n_images: int = 0) -> tuple[list[int], int]:
    """Token ids of the templated prompt, and the number of leading tokens to drop.

    At most ``max_tokens`` tokens are kept after the drop. A longer prompt is cut at its end
    (with a warning) while the image placeholders and the 5-token assistant tail stay, so
    the model still sees a well-formed turn; diffusers instead cuts the whole templated text
    at 1024 + drop tokens, tail included. An empty prompt is allowed, as in diffusers: its
    embedding is the template tail alone (5 tokens for t2i).

    For edit kinds each image placeholder is still the single <|image_pad|> token; the caller
    expands it to the vision tower's token count.
    """
    text, drop = build_prompt(kind, prompt, n_images)
    ids = list(tokenizer.encode(text))
    if len(ids) - drop <= max_tokens:
        return ids, drop
    fixed = len(tokenizer.encode(build_prompt(kind, "", n_images)[0])) - drop
    if max_tokens < fixed:
        raise ValueError(f"max_tokens={max_tokens} is shorter than the {fixed} tokens the {kind} template itself keeps")
    kept = ids[: drop + max_tokens - TAIL_TOKENS] + ids[-TAIL_TOKENS:]
    warnings.warn(
        f"prompt is {len(ids) - drop - fixed} tokens long; only the first {max_tokens - fixed} are used "
        f"(the text encoder input is limited to max_tokens={max_tokens})",
        stacklevel=2,
    )
    return kept, drop
