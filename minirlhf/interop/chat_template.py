"""Jinja chat templates, rendered the way `transformers`' `apply_chat_template` renders them.

The environment matches transformers (utils/chat_template_utils.py): a sandboxed,
immutable Jinja environment with trim_blocks and lstrip_blocks, the loop-controls
extension, a `{% generation %}...{% endgeneration %}` block (rendered as its body),
`tojson` that keeps non-ASCII characters, and the globals `raise_exception(msg)` and
`strftime_now(fmt)`. The template sees `messages`, `add_generation_prompt`, `tools=None`,
`documents=None` and each special token the tokenizer defines (`bos_token`, `eos_token`,
`unk_token`, `pad_token`) as a string; an undefined one renders as "".

Every error of a template is one line naming where it came from (the file, or file and key):
a syntax error with its line, `raise_exception(msg)` as "the template refuses this
conversation: msg", and any other failure while rendering (an undefined name, adding a
string to a number, a sandbox violation) with what went wrong.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The chat format of our own SentencePiece models, as a template: bos, "User: ...\nAssistant:",
# each assistant turn " {content}" + eos. Used when a model comes without a template and to
# export our tokenizer.
PLAIN_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}"
    "{% else %}"
    "{% if not loop.first and messages[loop.index0 - 1]['role'] != 'assistant' %}{{ '\n' }}{% endif %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] }}"
    "{% if loop.last and add_generation_prompt or not loop.last and messages[loop.index0 + 1]['role'] == 'assistant' %}"
    "{{ '\nAssistant:' }}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
)


class _GenerationBlock(Extension):
    """`{% generation %}body{% endgeneration %}` renders as body (transformers marks the
    assistant's characters with it; the text is unchanged)."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class TemplateRaised(jinja2.exceptions.TemplateError):
    """The template called raise_exception(message)."""


def _raise_exception(message):
    raise TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str, where: str = "chat template") -> jinja2.Template:
    """The compiled template; raises ValueError `{where}: line N: ...` on a syntax error (where:
    the file, or file and key, the template came from)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}: line {e.lineno}: {e.message}") from None


def render(source: str, messages: list[dict], *, add_generation_prompt: bool, special_tokens: dict[str, str],
           where: str = "chat template") -> str:
    """The conversation as the template writes it; special_tokens: {"bos_token": "<s>", ...}
    (only those the tokenizer defines). Raises ValueError `{where}: ...` (where: the file, or
    file and key, of the template) when the template does not compile, calls raise_exception,
    or fails in any other way while rendering."""
    template = compile_template(source, where)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                tools=None, documents=None, **special_tokens)
    except TemplateRaised as e:
        raise ValueError(f"{where}: the template refuses this conversation: {_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001  the template is the user's: whatever it does wrong is one line
        what = _first_line(e) if isinstance(e, jinja2.TemplateError) else f"{type(e).__name__}: {_first_line(e)}"
        raise ValueError(f"{where}: rendering failed: {what}") from None


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
