"""jaxserve.tokenizer against the reference: transformers' tokenizer of the same SmolLM2 GGUF."""
import os

import pytest

from jaxserve.tokenizer import IncrementalDecoder, Tokenizer

TEXTS = [
    "Hello, world!",
    "Year 2024: 12345",
    "1234567890 3.14159 -0.5e10",
    "def f(x):\n    if x:\n        return x + 1\n\n\treturn None\n",
    "L'Étoile ☃ 😀",
    "naïve café — “quotes” 你好世界 🎉🇫🇷",
    "<|im_start|>user\nhi<|im_end|>",
    "  leading and trailing spaces  ",
    "a\r\n\r\nb   c\n\n\n",
    "don't I'll we've THEY'RE",
    " ",
]
PLAIN_TEXTS = [s for s in TEXTS if "<|" not in s]

USER_ONLY = [{"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "What is 2+2?\nAnswer with a digit."},
]


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[2]


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))


# -- encoding / decoding ---------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, hf_tok, text):
    ours = tok.encode(text)
    assert ours == hf_tok.encode(text, add_special_tokens=False)
    # transformers adds no BOS for this model either, so the default encode agrees too.
    assert ours == hf_tok.encode(text)


def test_special_tokens_are_single_ids(tok, hf_tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == hf_tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[-1] == hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_ids == (hf_tok.eos_token_id,)
    assert tok.bos_token_id == hf_tok.bos_token_id
    # skipped by default, kept on request
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_decode_encode_roundtrip(tok, hf_tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tok.decode(ids)


def test_vocab_size(tok, hf_tok):
    assert tok.vocab_size == len(hf_tok)


# -- chat template ---------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [USER_ONLY, MULTI_TURN], ids=["user_only", "multi_turn"])
def test_chat_template_matches_transformers(tok, hf_tok, messages):
    ours = tok.apply_chat_template(messages)
    ref = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert ours.endswith("<|im_start|>assistant\n")
    for m in messages:
        assert m["content"] in ours


def test_chat_template_without_generation_prompt(tok, hf_tok):
    ours = tok.apply_chat_template(MULTI_TURN, add_generation_prompt=False)
    assert ours == hf_tok.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=False)
    assert not ours.endswith("<|im_start|>assistant\n")


CUSTOM_TEMPLATE = (
    "{% for m in messages %}\n"
    "    {% if m['role'] == 'system' %}\n"
    "[SYS] {{ m['content'] | trim }}\n"
    "    {% else %}\n"
    "{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
    "    {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "  {{ bos_token }}assistant:\n"
    "{% endif %}"
)


def test_custom_template_renders_like_transformers(tok, hf_tok):
    """Whitespace control (trim_blocks / lstrip_blocks) and bos/eos variables as in transformers."""
    custom = Tokenizer(tok.tok, CUSTOM_TEMPLATE, tok.bos_token_id, tok.eos_token_ids)
    for gen in (True, False):
        ours = custom.apply_chat_template(MULTI_TURN, add_generation_prompt=gen)
        ref = hf_tok.apply_chat_template(MULTI_TURN, chat_template=CUSTOM_TEMPLATE, tokenize=False,
                                         add_generation_prompt=gen)
        assert ours == ref
    assert "<|im_start|>user: Hi!<|im_end|>" in ours


# -- persistence -----------------------------------------------------------------------------------

def test_save_from_dir_roundtrip(tok, tmp_path):
    tok.save(str(tmp_path))
    loaded = Tokenizer.from_dir(str(tmp_path))
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text), text
    assert loaded.chat_template == tok.chat_template
    assert loaded.chat_template  # a real template survived, not two Nones
    assert loaded.eos_token_ids == tok.eos_token_ids == (2,)
    assert loaded.bos_token_id == tok.bos_token_id
    assert loaded.add_bos == tok.add_bos
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.apply_chat_template(MULTI_TURN) == tok.apply_chat_template(MULTI_TURN)


def test_from_dir_reads_hugging_face_layout(tok, hf_tok, tmp_path):
    """A directory written by transformers (eos_token by name, chat_template.jinja) loads too."""
    hf_tok.save_pretrained(str(tmp_path))
    loaded = Tokenizer.from_dir(str(tmp_path))
    assert loaded.eos_token_ids == (hf_tok.eos_token_id,)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text), text
    assert loaded.apply_chat_template(MULTI_TURN) == hf_tok.apply_chat_template(
        MULTI_TURN, tokenize=False, add_generation_prompt=True)


# -- incremental decoding --------------------------------------------------------------------------

STREAM_TEXT = "Hi 😀🎉 naïve ☃ 你好, L'Étoile done 🇫🇷"


def test_incremental_decoder_one_token_at_a_time(tok):
    ids = tok.encode(STREAM_TEXT)
    # the test only means something if some tokens carry part of a multi-byte character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    dec = IncrementalDecoder(tok)
    deltas = [dec.push([i]) for i in ids]
    assert "".join(deltas) == tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # something was held back while a character was incomplete


def test_incremental_decoder_uneven_chunks(tok):
    ids = tok.encode(STREAM_TEXT)
    dec = IncrementalDecoder(tok)
    out, i, step = [], 0, 1
    while i < len(ids):
        out.append(dec.push(ids[i:i + step]))
        i += step
        step = step % 3 + 1
    assert "".join(out) == STREAM_TEXT



LONG_TEXT = ("Le café naïve à l'hôtel — 你好世界，今日は 😀🎉🇫🇷 ☃ Ünïcödé ß ø 한국어 ✓ → ∑ x² "
             "def f(x):\n    return x + 1\n\n") * 60


class _CountingTokenizer(Tokenizer):
    """Counts decode calls and the ids passed to them."""

    def __init__(self, base):
        super().__init__(base.tok, base.chat_template, base.bos_token_id, base.eos_token_ids, base.add_bos)
        self.calls = self.decoded = 0

    def decode(self, ids, skip_special_tokens=True):
        ids = list(ids)
        self.calls += 1
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


def _long_ids(tok, n=2000):
    ids = tok.encode(LONG_TEXT)
    while tok.decode(ids[:n]).endswith("\ufffd"):  # end on a whole character
        n += 1
    assert n <= len(ids)
    ids = ids[:n]
    # special tokens in the middle (skipped by decode), one between the bytes of a character
    split = next(i for i in range(100, n) if "\ufffd" in tok.decode([ids[i]]))
    im_start, im_end = tok.encode("<|im_start|>")[0], tok.encode("<|im_end|>")[0]
    ids[split + 1:split + 1] = [im_end]
    ids[50:50] = [im_start, im_end]
    return ids


@pytest.mark.parametrize("chunking", ["one_at_a_time", "groups"])
def test_incremental_decoder_matches_decode_on_long_text(tok, chunking):
    """Multi-byte characters (emoji, CJK, accented, flags) and special tokens, over 2,000 tokens."""
    ids = _long_ids(tok)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) > 50
    sizes = [1] if chunking == "one_at_a_time" else [1, 2, 3, 5, 8, 13, 7, 4]
    dec = IncrementalDecoder(tok)
    deltas, i, k = [], 0, 0
    while i < len(ids):
        step = sizes[k % len(sizes)]
        deltas.append(dec.push(ids[i:i + step]))
        i, k = i + step, k + 1
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert dec.ids == ids
    assert dec.emitted == len(tok.decode(ids))
    assert "<|im_end|>" in tok.decode(ids, skip_special_tokens=False)  # specials were there, skipped


def test_incremental_decoder_cost_is_linear(tok):
    """Each push decodes a short window, not the whole output: O(n) per request, not O(n^2)."""
    ids = _long_ids(tok)
    counting = _CountingTokenizer(tok)
    dec = IncrementalDecoder(counting)
    out = "".join(dec.push([i]) for i in ids)
    assert out == tok.decode(ids)
    n = len(ids)
    assert counting.calls <= 2 * n
    assert counting.decoded < 20 * n, counting.decoded  # re-decoding everything: ~n^2 / 2 = 2e6
    # and no single push looks at more than a handful of tokens
    counting.calls = counting.decoded = 0
    dec.push([ids[0]])
    assert counting.decoded < 40


# -- bad input -------------------------------------------------------------------------------------

def test_from_dir_missing(tmp_path):
    missing = str(tmp_path / "no_such_tokenizer")
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        Tokenizer.from_dir(missing)


@pytest.mark.parametrize("content", ["{not json at all", "{}", ""])
def test_from_dir_corrupt_tokenizer_json(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        Tokenizer.from_dir(str(tmp_path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("messages, index", [
    ([{"role": "user"}], 0),
    ([{"role": "user", "content": None}], 0),
    ([{"role": "system", "content": "x"}, {"content": "hi"}], 1),
    ([{"role": "user", "content": "hi"}, "not a dict"], 1),
])
def test_chat_template_bad_messages(tok, messages, index):
    with pytest.raises(ValueError, match=rf"messages\[{index}\]"):
        tok.apply_chat_template(messages)


def test_chat_template_missing(tok):
    bare = Tokenizer(tok.tok, chat_template=None, eos_token_ids=tok.eos_token_ids)
    with pytest.raises(ValueError, match="chat template"):
        bare.apply_chat_template(USER_ONLY)
