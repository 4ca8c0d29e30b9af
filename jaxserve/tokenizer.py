"""Tokenizer and chat template, from a tokenizer.json or from GGUF metadata.

Tokenization itself is the `tokenizers` library; chat templates are rendered with jinja2,
as Hugging Face does, so a model's own template applies unchanged.
"""
from __future__ import annotations

import functools
import json
from typing import Optional, Sequence

import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxserve import paths

_CONFIG_FILE = "tokenizer_config.json"
_TOKENIZER_FILE = "tokenizer.json"
_GGUF_CONTROL_TOKEN = 3  # llama.cpp token type of special tokens


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, chat_template: Optional[str] = None,
                 bos_token_id: Optional[int] = None, eos_token_ids: Sequence[int] = (),
                 add_bos: bool = False):
        self.tok = tok
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def special_ids(self) -> frozenset:
        """Ids of the special tokens, which decode() leaves out by default."""
        return frozenset(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must have string 'role' and 'content' fields")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tokens = self.tok.get_vocab(with_added_tokens=True)
        inverse = {v: k for k, v in tokens.items()}
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=inverse.get(self.bos_token_id, ""),
            eos_token=inverse.get(self.eos_token_ids[0], "") if self.eos_token_ids else "")

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Writes tokenizer.json and tokenizer_config.json into `directory` (any jaxserve.paths path)."""
        root = paths.as_path(directory)
        root.mkdir(parents=True, exist_ok=True)
        (root / _TOKENIZER_FILE).write_text(self.tok.to_str())
        (root / _CONFIG_FILE).write_text(json.dumps(
            {"chat_template": self.chat_template, "bos_token_id": self.bos_token_id,
             "eos_token_ids": list(self.eos_token_ids), "add_bos": self.add_bos}, indent=1))

    @classmethod
    def from_dir(cls, directory: str, eos_token_ids: Sequence[int] = (),
                 bos_token_id: Optional[int] = None) -> "Tokenizer":
        """Loads tokenizer.json (+ tokenizer_config.json / chat_template.jinja) from a directory
        (any jaxserve.paths path)."""
        root = paths.as_path(directory)
        path = root / _TOKENIZER_FILE
        if not path.exists():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = tokenizers.Tokenizer.from_str(path.read_text())
        except Exception as e:
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from e
        conf = {}
        conf_path = root / _CONFIG_FILE
        if conf_path.exists():
            conf = json.loads(conf_path.read_text())
        template = conf.get("chat_template")
        template_path = root / "chat_template.jinja"
        if not template and template_path.exists():
            template = template_path.read_text()
        if "eos_token_ids" in conf:
            eos_token_ids = conf["eos_token_ids"]
        elif isinstance(conf.get("eos_token"), str) and tok.token_to_id(conf["eos_token"]) is not None:
            eos_token_ids = [tok.token_to_id(conf["eos_token"])]
        if conf.get("bos_token_id") is not None:
            bos_token_id = conf["bos_token_id"]
        elif isinstance(conf.get("bos_token"), str):
            bos_token_id = tok.token_to_id(conf["bos_token"])
        return cls(tok, template, bos_token_id, eos_token_ids, bool(conf.get("add_bos", conf.get("add_bos_token", False))))

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        """Builds a byte-level BPE tokenizer from a GGUF file's `tokenizer.ggml.*` metadata."""
        f = reader.fields
        kind = f["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in f else None
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 byte-level BPE is)")
        tokens = f["tokenizer.ggml.tokens"].contents()
        merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
        types = f["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in f else []
        tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                              fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        special = [tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(types) if t == _GGUF_CONTROL_TOKEN]
        tok.add_special_tokens(special)

        def scalar(key):
            return int(f[key].contents()) if key in f else None
        eos = scalar("tokenizer.ggml.eos_token_id")
        template = f["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in f else None
        # Hugging Face does not prepend BOS for these models; we match the reference implementation.
        return cls(tok, template, scalar("tokenizer.ggml.bos_token_id"), [eos] if eos is not None else [])


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, holding back split UTF-8 characters.

    Each push decodes only a short window, as vLLM and text-generation-inference do: the tokens
    from `prefix_offset` to `read_offset` (text already emitted, kept as context so that a
    decoder's leading-space handling and byte merging see the same neighbourhood) and from
    `prefix_offset` to the end; the delta is what the longer decode adds. While the window ends
    in an incomplete character ("\ufffd") nothing is emitted and the offsets stay put, so the
    deltas of a whole request add up to exactly `tokenizer.decode(ids)` (if the last token
    completes its character). The cost per push is O(new tokens + window), not O(len(ids)).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list = []  # every id pushed, as given
        self.emitted = 0  # characters emitted so far
        # decode() skips special tokens before decoding, so leaving them out of the window
        # changes nothing in the text, and a run of them does not grow the window.
        self._skip = getattr(tokenizer, "special_ids", frozenset())
        self._window: list = []  # ids not skipped; offsets below index this list
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_ids: Sequence[int]) -> str:
        token_ids = list(token_ids)
        self.ids.extend(token_ids)
        kept = [t for t in token_ids if t not in self._skip] if self._skip else token_ids
        if not kept:
            return ""
        w = self._window
        w.extend(kept)
        prefix_text = self.tokenizer.decode(w[self.prefix_offset:self.read_offset])
        new_text = self.tokenizer.decode(w[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(w)
        if self.prefix_offset > 4096:  # drop what no window will read again
            del w[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        self.emitted += len(delta)
        return delta
