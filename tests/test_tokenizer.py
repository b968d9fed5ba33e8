"""QwenTokenizer against transformers' Qwen2Tokenizer; templates and drop counts against
diffusers' pipelines; tokenizer discovery and prompt truncation."""
from __future__ import annotations

import inspect
import json
import shutil
import warnings

import pytest
import torch

from qwenimage_pack.core.encoders import tokenizer as T
from qwenimage_pack.core.errors import WeightFileError

transformers = pytest.importorskip("transformers")

TRICKY = [
    "A cat sitting on a windowsill",
    "  multiple   spaces\n\n",
    "\n\n\nleading newlines and trailing spaces   ",
    "tabs\tand\r\nCRLF\r\n\r\n  mixed \t \n",
    "一只猫坐在窗台上，阳光明媚。",
    "日本語のテキスト、한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵",
    "numbers 1234567890 3.14159 1,000,000 2024-01-01 0x1F",
    "e\u0301 vs é, ﬁ ligature, Å/Å",  # NFC folds the combining forms
    "don't I'LL we're THEY'VE it's",
    "punctuation!!! ??? ... --- ___ ``` '''",
    "Picture 1: <|vision_start|><|image_pad|><|vision_end|>edit this",
    "<|im_start|>user\nhello<|im_end|><|endoftext|>",
    "<tool_call>x</tool_call><|fim_prefix|>",
    "",
    " ",
]


@pytest.fixture(scope="module")
def reference(tokenizer_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    return T.QwenTokenizer.from_dir(tokenizer_dir)


def ref_ids(reference, text):
    return reference.encode(text, add_special_tokens=False)


def test_tricky_strings_match_transformers(ours, reference):
    for text in TRICKY + [T.T2I_TEMPLATE.format("a dog"), T.EDIT_TEMPLATE.format("make it blue")]:
        assert ours.encode(text) == ref_ids(reference, text), repr(text)


def test_special_token_ids(ours):
    for token, token_id in [("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645),
                            ("<|vision_start|>", 151652), ("<|vision_end|>", 151653), ("<|image_pad|>", 151655)]:
        assert ours.encode(token) == [token_id]


def test_vocab_and_merges_only(tokenizer_dir, reference, tmp_path):
    """Without tokenizer_config.json the added tokens still get their ids."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, tmp_path / name)
    bare = T.QwenTokenizer(tmp_path)  # a folder is accepted directly too
    for text in TRICKY:
        assert bare.encode(text) == ref_ids(reference, text), repr(text)


def test_tokenizer_json(reference, tmp_path):
    reference.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_json = T.QwenTokenizer.from_dir(tmp_path)
    for text in TRICKY:
        assert from_json.encode(text) == ref_ids(reference, text), repr(text)


def test_from_vocab_merges(tokenizer_dir, reference):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = [l for l in (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
              if l and not l.startswith("#version")]
    mem = T.QwenTokenizer.from_vocab_merges(vocab, merges)
    for text in TRICKY:
        assert mem.encode(text) == ref_ids(reference, text), repr(text)


def test_broken_tokenizer_folder(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(WeightFileError, match="merges.txt"):
        T.QwenTokenizer.from_dir(tmp_path)


def test_templates_and_drop_counts_match_diffusers(reference):
    diffusers = pytest.importorskip("diffusers")
    none = dict(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    t2i = diffusers.QwenImagePipeline(**none)
    edit = diffusers.QwenImageEditPipeline(**none, processor=None)
    plus = diffusers.QwenImageEditPlusPipeline(**none, processor=None)
    assert (T.T2I_TEMPLATE, T.T2I_DROP) == (t2i.prompt_template_encode, t2i.prompt_template_encode_start_idx)
    assert (T.EDIT_TEMPLATE, T.EDIT_DROP) == (edit.prompt_template_encode, edit.prompt_template_encode_start_idx)
    assert (T.EDIT_PLUS_TEMPLATE, T.EDIT_DROP) == (plus.prompt_template_encode, plus.prompt_template_encode_start_idx)

    # The drop is exactly the system turn plus "<|im_start|>user\n".
    for template, drop in [(T.T2I_TEMPLATE, T.T2I_DROP), (T.EDIT_TEMPLATE, T.EDIT_DROP), (T.EDIT_PLUS_TEMPLATE, T.EDIT_DROP)]:
        prefix = template[: template.index("<|im_start|>user\n") + len("<|im_start|>user\n")]
        assert len(ref_ids(reference, prefix)) == drop
        ids = ref_ids(reference, template.format("x"))
        assert ids[:drop] == ref_ids(reference, prefix)

    # Edit-Plus: the text diffusers hands its processor for three images.
    seen = {}

    class Stop(Exception):
        pass

    def processor(text, **kwargs):
        seen["text"] = text
        raise Stop

    plus.processor = processor
    fn = inspect.unwrap(diffusers.QwenImageEditPlusPipeline._get_qwen_prompt_embeds)
    with pytest.raises(Stop):
        fn(plus, "swap them", image=[object(), object(), object()], device="cpu", dtype=torch.float32)
    assert seen["text"] == [T.build_prompt("edit_plus", "swap them", n_images=3)[0]]
    assert T.build_prompt("edit", "x", 1) == (T.EDIT_TEMPLATE.format("x"), 64)
    assert T.build_prompt("edit_plus", "x", 0) == (T.EDIT_PLUS_TEMPLATE.format("x"), 64)


def test_build_prompt_errors():
    with pytest.raises(ValueError, match="unknown prompt kind"):
        T.build_prompt("video", "x")
    with pytest.raises(ValueError, match="edit_plus"):
        T.build_prompt("edit", "x", n_images=2)
    with pytest.raises(ValueError, match="no image slots"):
        T.build_prompt("t2i", "x", n_images=1)
    with pytest.raises(ValueError, match="string"):
        T.build_prompt("t2i", None)


def test_truncation(ours):
    prompt = " ".join(f"word{i}" for i in range(400))
    full, drop = T.encode_prompt_ids(ours, prompt, max_tokens=4096)
    assert drop == 34 and len(full) - drop > 100
    with pytest.warns(UserWarning, match="max_tokens=100"):
        ids, drop = T.encode_prompt_ids(ours, prompt, max_tokens=100)
    assert len(ids) - drop == 100
    assert ids[: drop + 95] == full[: drop + 95]
    assert ids[-5:] == full[-5:] == ours.encode("<|im_end|>\n<|im_start|>assistant\n")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty, drop = T.encode_prompt_ids(ours, "")
        short, _ = T.encode_prompt_ids(ours, "a cat")
    assert len(empty) - drop == 5 and len(short) - drop == 7

    # Edit: truncation never reaches the image placeholders.
    with pytest.warns(UserWarning):
        ids, drop = T.encode_prompt_ids(ours, prompt, kind="edit_plus", n_images=2, max_tokens=40)
    assert len(ids) - drop == 40 and ids.count(T.IMAGE_PAD_ID) == 2
    with pytest.raises(ValueError, match="max_tokens"):
        T.encode_prompt_ids(ours, prompt, kind="edit_plus", n_images=2, max_tokens=10)


def make_tokenizer_dir(path):
    path.mkdir(parents=True)
    (path / "vocab.json").write_text("{}")
    (path / "merges.txt").write_text("#version: 0.2\n")
    return path


def test_find_tokenizer_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(T.TOKENIZER_ENV, raising=False)
    te_file = tmp_path / "text_encoders" / "qwen_2.5_vl_7b.safetensors"
    te_file.parent.mkdir()
    te_file.write_bytes(b"")
    bundled = make_tokenizer_dir(tmp_path / "comfy" / "qwen25_tokenizer")

    assert T.find_tokenizer_dir(te_file, extra_dirs=[bundled]) == bundled
    beside = make_tokenizer_dir(tmp_path / "text_encoders" / "qwen25_tokenizer")
    assert T.find_tokenizer_dir(te_file, extra_dirs=[bundled]) == beside

    # diffusers folder: text_encoder/ (file or folder given) and its sibling tokenizer/.
    diff = tmp_path / "Qwen-Image"
    (diff / "text_encoder").mkdir(parents=True)
    shard = diff / "text_encoder" / "model-00001-of-00004.safetensors"
    shard.write_bytes(b"")
    sibling = make_tokenizer_dir(diff / "tokenizer")
    assert T.find_tokenizer_dir(shard) == sibling
    assert T.find_tokenizer_dir(diff / "text_encoder") == sibling

    env = make_tokenizer_dir(tmp_path / "env_tok")
    monkeypatch.setenv(T.TOKENIZER_ENV, str(env))
    assert T.find_tokenizer_dir(te_file, extra_dirs=[bundled]) == env


def test_find_tokenizer_dir_error_lists_every_place(tmp_path, monkeypatch):
    env = tmp_path / "nowhere_env"
    monkeypatch.setenv(T.TOKENIZER_ENV, str(env))
    te_file = tmp_path / "text_encoder" / "model.safetensors"
    te_file.parent.mkdir()
    te_file.write_bytes(b"")
    extra = tmp_path / "extra"
    with pytest.raises(WeightFileError) as info:
        T.find_tokenizer_dir(te_file, extra_dirs=[extra])
    msg = str(info.value)
    expected = [env, te_file.parent / "qwen25_tokenizer", te_file.parent / "tokenizer", te_file.parent,
                tmp_path / "tokenizer", extra]
    for place in expected:
        assert str(place) in msg
    assert T.TOKENIZER_ENV in msg and "vocab.json" in msg
    assert isinstance(info.value, FileNotFoundError)  # loaders may catch it as either
