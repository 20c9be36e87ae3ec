"""A Hugging Face `tokenizers` tokenizer with the model's Jinja chat template.

Framing is defined to equal `transformers`:
    prompt_ids(messages) == tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    response_ids(text)   == tokenizer(text, add_special_tokens=False).input_ids + [end-of-turn]
i.e. the template is rendered (chat_template.py) and the text tokenized without adding
special tokens, since the template writes its own.

The end-of-turn token is read off the template itself: a probe conversation (one user turn,
one assistant turn) is rendered and the first special token after the assistant's text is
the token that closes a turn (`<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3, `</s>` for
Mistral). Generation stops on it and the reward model reads its score there. A template
that writes no special token after a turn falls back to the tokenizer's eos_token; one that
fails on the probe (calls raise_exception, or any other error) is refused when the tokenizer
is loaded, naming its file: every prompt would fail the same way later. An empty (blank)
template is refused too; a missing one means our plain framing (the importer says so).

On disk (save/load): tokenizer.json, tokenizer_config.json (special tokens) and
chat_template.jinja — the layout `transformers` reads too.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer

from ..tokenizer import HF_TOKENIZER_FILE, ChatTokenizer, Prompt, as_messages
from .chat_template import PLAIN_TEMPLATE, compile_template, render
from ..files import read_json_object, read_text

CONFIG_FILE, TEMPLATE_FILE = "tokenizer_config.json", "chat_template.jinja"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_PROBE = "minirlhf-probe-turn"


def _token_text(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class HFTokenizer(ChatTokenizer):
    """tokenizer: a `tokenizers.Tokenizer`; chat_template: Jinja source (None: our plain
    "User: ...\\nAssistant:" format, PLAIN_TEMPLATE; own_template says which); special:
    {"bos_token": str, ...} (the ones the model defines); add_bos: whether a pretraining
    document starts with bos; context_len: the imported model's own context
    (max_position_embeddings; None for ours), saved as tokenizer_config.json's
    model_max_length. where / template_where name the file of the special tokens / of the
    template in messages. Raises ValueError when a special token is not in the vocabulary,
    there is no eos_token, or the template is empty (blank) or does not compile."""

    def __init__(self, tokenizer: _RustTokenizer, chat_template: str | None, special: dict[str, str],
                 add_bos: bool = False, *, context_len: int | None = None, where: str = "tokenizer",
                 template_where: str = "chat template"):
        self.tok = tokenizer
        if chat_template is not None and not chat_template.strip():
            raise ValueError(f"{template_where}: empty chat template; write the model's template there, or give "
                             "none (then prompts are framed in our plain format 'User: ...\\nAssistant:')")
        self.own_template = chat_template is not None
        self.chat_template = chat_template or PLAIN_TEMPLATE
        self.template_where = template_where if self.own_template else "chat template"
        self.context_len = context_len
        compile_template(self.chat_template, where=self.template_where)  # a syntax error names its file here
        self.special = {k: v for k, v in special.items() if k in SPECIAL_NAMES and v is not None}
        ids = {}
        for name, text in self.special.items():
            i = tokenizer.token_to_id(text)
            if i is None:
                raise ValueError(f"{where}: {name}={text!r} is not in the vocabulary")
            ids[name] = i
        if "eos_token" not in ids:
            raise ValueError(f"{where}: eos_token: missing (needed to end documents and turns)")
        self.bos_id = ids.get("bos_token")
        self.doc_eos_id = ids["eos_token"]
        self.pad_id = ids.get("pad_token", self.doc_eos_id)
        self.add_bos = bool(add_bos and self.bos_id is not None)
        self._special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.eos_id = self._end_of_turn()

    def with_pad_token(self, pad_id: int) -> "HFTokenizer":
        """The same tokenizer with another pad token (by id; a token of the vocabulary)."""
        special = {**self.special, "pad_token": self.tok.id_to_token(pad_id)}
        return HFTokenizer(self.tok, self.chat_template if self.own_template else None, special, self.add_bos,
                           context_len=self.context_len, template_where=self.template_where)

    # ---- the interface ----
    @property
    def vocab_size(self) -> int:
        """1 + the largest id the tokenizer can produce (added tokens included)."""
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.tok.decode([i for i in ids if i not in (self.pad_id, self.bos_id)], skip_special_tokens=True)

    def document(self, text: str) -> list[int]:
        """[bos] (when the model adds one) + text + eos_token (the tokenizer's end of text)."""
        return ([self.bos_id] if self.add_bos else []) + self.encode(text) + [self.doc_eos_id]

    def render(self, prompt: Prompt, add_generation_prompt: bool = True) -> str:
        """The conversation as text, written by the chat template."""
        return render(self.chat_template, as_messages(prompt), add_generation_prompt=add_generation_prompt,
                      special_tokens=self.special, where=self.template_where)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """apply_chat_template(messages, add_generation_prompt=True), tokenized without added specials."""
        return self.encode(self.render(prompt))

    def response_ids(self, response: str) -> list[int]:
        return self.encode(response) + [self.eos_id]

    def _end_of_turn(self) -> int:
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        # a template that fails here would fail on every prompt: refused now (ValueError naming it)
        text = render(self.chat_template, probe, add_generation_prompt=False, special_tokens=self.special,
                      where=self.template_where)
        at = text.find(_PROBE)
        if at < 0:
            return self.doc_eos_id
        after = self.encode(text[at + len(_PROBE):])
        return next((i for i in after if i in self._special_ids), self.doc_eos_id)

    # ---- files ----
    def save(self, directory) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(d / HF_TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special, "add_bos_token": self.add_bos,
                  "clean_up_tokenization_spaces": False}
        if self.context_len:
            config["model_max_length"] = self.context_len
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (d / TEMPLATE_FILE).write_text(self.chat_template)

    @classmethod
    def load(cls, directory) -> "HFTokenizer":
        """From a directory with tokenizer.json; special tokens from tokenizer_config.json (or
        special_tokens_map.json); the chat template from chat_template.jinja, else from
        tokenizer_config.json's "chat_template" (a string, or a list of named templates: "default");
        context_len from tokenizer_config.json's model_max_length (as we write it: an integer
        below 2**31; transformers writes 1e30 for "unknown"). Raises ValueError naming the file
        on an unreadable or missing one, and naming the template's file or key when it is
        empty, not text, or (a list) has no "default"."""
        d = Path(directory)
        try:
            tok = _RustTokenizer.from_file(str(d / HF_TOKENIZER_FILE))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{d / HF_TOKENIZER_FILE}: unreadable tokenizer: {e}") from None
        config, where = {}, None
        for name in (CONFIG_FILE, "special_tokens_map.json"):
            if (d / name).is_file():
                read = read_json_object(d / name)
                config = {**read, **config}
                where = where or str(d / name)
        if where is None:
            raise ValueError(f"{d / CONFIG_FILE}: missing (it names the special tokens; eos_token is needed)")
        special = {k: _token_text(config.get(k)) for k in SPECIAL_NAMES}
        template, template_where = None, None
        listed = config.get("chat_template")
        if (d / TEMPLATE_FILE).is_file():
            template, template_where = read_text(d / TEMPLATE_FILE), str(d / TEMPLATE_FILE)
        elif isinstance(listed, str):
            template, template_where = listed, f"{d / CONFIG_FILE}: chat_template"
        elif isinstance(listed, list):  # named templates; transformers uses "default" unless told otherwise
            named = {t.get("name"): t.get("template") for t in listed if isinstance(t, dict)}
            template, template_where = named.get("default"), f"{d / CONFIG_FILE}: chat_template 'default'"
            if not isinstance(template, str):
                raise ValueError(f"{template_where}: missing (named templates: "
                                 f"{', '.join(map(repr, named)) or 'none'}); a 'default' template is needed")
        elif listed is not None:
            raise ValueError(f"{d / CONFIG_FILE}: chat_template: expected a string or a list of named templates, "
                             f"got {type(listed).__name__}")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # the tokenizer.json post-processor decides, as in transformers
            with_special = tok.encode("a").ids
            add_bos = len(with_special) > len(tok.encode("a", add_special_tokens=False).ids) and \
                special.get("bos_token") is not None and with_special[0] == tok.token_to_id(special["bos_token"])
        context = config.get("model_max_length")
        context = context if isinstance(context, int) and not isinstance(context, bool) and 0 < context < 2**31 else None
        return cls(tok, template, special, add_bos=bool(add_bos), context_len=context, where=where,
                   template_where=template_where or "chat template")
