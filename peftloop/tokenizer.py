"""A Hugging Face tokenizer folder, read without transformers.

    tokenizer = Tokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")   # or a folder
    ids = tokenizer.encode("Hello")                                  # with BOS when the model wants it
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

What is read, and where from (the same rules as transformers' fast tokenizers):

- ``tokenizer.json``: the whole pipeline (normalizer, pre-tokenizer, BPE/Unigram model, added
  tokens, post-processor, decoder), run by the tokenizers library.
- ``tokenizer_config.json``, falling back to ``special_tokens_map.json``: bos/eos/pad/unk and
  the additional special tokens. A named special token missing from the vocabulary is added as a
  special token. ``add_bos_token`` / ``add_eos_token``, when the file sets either (or when
  tokenizer.json has no post-processor), rebuild the post-processor as ``[BOS] $A [EOS]``.
- The chat template: ``chat_template.jinja`` if present, else ``tokenizer_config.json``'s
  ``chat_template`` (a string, or a list of named templates of which "default" is used). It is
  rendered with Jinja2 in a sandbox set up as transformers sets it up (trim_blocks,
  lstrip_blocks, loop controls, ``raise_exception``, ``tojson``, ``strftime_now``), and the text
  is tokenized with ``add_special_tokens=False`` (templates write their own BOS).
- ``generation_config.json``'s ``eos_token_id`` (Llama 3 instruct stops at either of two tokens).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from peftloop.hub import resolve_model

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TokenizerError(ValueError):
    """A tokenizer folder is missing a file, has an invalid one, or cannot do what was asked."""


class Tokenizer:
    """``tokenizer.json`` plus the special tokens and chat template of its folder."""

    def __init__(self, backend, config: dict[str, Any] | None = None, chat_template: str | None = None,
                 generation_eos: list[int] | None = None, source: str = "tokenizer"):
        self.backend = backend
        self.source = source
        config = config or {}
        self.special_tokens = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        self.additional_special_tokens = [_token_text(t) for t in extra] if isinstance(extra, list) else []
        missing = [t for t in [*self.special_tokens.values(), *self.additional_special_tokens]
                   if t is not None and backend.token_to_id(t) is None]
        if missing:
            backend.add_special_tokens(missing)
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
            backend.post_processor = processors.TemplateProcessing(
                single=self._template("$A:0"), pair=self._template("$A:0") + " " + self._template("$B:1"),
                special_tokens=[(t, backend.token_to_id(t)) for t in (self._added_bos, self._added_eos) if t])
        self.chat_template = chat_template
        self.generation_eos = generation_eos
        self.model_max_length = config.get("model_max_length")

    # Construction ------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, revision: str | None = None,
                        cache_dir: str | Path | None = None) -> Tokenizer:
        """Read a tokenizer from a model folder or hub id (only the tokenizer files are fetched)."""
        folder = resolve_model(name_or_path, revision=revision, cache_dir=cache_dir, weights=False)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: not found (peftloop reads fast tokenizers only: tokenizer.json, "
                                 "not a sentencepiece tokenizer.model)")
        try:
            backend = Backend.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = {**_read_json(folder / "special_tokens_map.json"),
                  **_read_json(folder / "tokenizer_config.json")}
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        eos = _read_json(folder / "generation_config.json").get("eos_token_id")
        generation_eos = [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else None
        return cls(backend, config, template, generation_eos, source=str(folder))

    def _template(self, sequence: str) -> str:
        parts = [f"{self._added_bos}:{sequence[-1]}"] if self._added_bos else []
        parts.append(sequence)
        if self._added_eos:
            parts.append(f"{self._added_eos}:{sequence[-1]}")
        return " ".join(parts)

    @property
    def _added_bos(self) -> str | None:
        return self.special_tokens["bos_token"] if self.add_bos_token else None

    @property
    def _added_eos(self) -> str | None:
        return self.special_tokens["eos_token"] if self.add_eos_token else None

    # Special tokens ------------------------------------------------------------------------------

    def token_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id("pad_token")

    @property
    def stop_token_ids(self) -> list[int]:
        """Where generation stops: generation_config.json's eos ids, else the tokenizer's eos."""
        if self.generation_eos:
            return list(self.generation_eos)
        return [self.eos_token_id] if self.eos_token_id is not None else []

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # Text <-> ids ------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str,
                            add_special_tokens: bool = False) -> tuple[list[int], list[tuple]]:
        """Token ids and, for each, the (start, end) characters of ``text`` it came from."""
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # Chat ---------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                    **kwargs) -> str:
        """The chat template's text for ``messages`` (transformers' apply_chat_template(tokenize=False))."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: the tokenizer has no chat_template "
                                 "(tokenizer_config.json or chat_template.jinja), "
                                 "so chat messages cannot be formatted")
        special = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables = {**special, "additional_special_tokens": self.additional_special_tokens, **kwargs}
        # as transformers does: keys whose value is None are dropped from each message
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compiled(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
                **variables)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template: {e}") from None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs) -> list[int] | str:
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def chat_spans(self, messages: list[dict[str, Any]],
                   trained: list[int]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each message in ``trained``: from
        the end of the text the template renders before it (with the generation prompt) to the
        end of the text that includes it. The span is what the model must produce for that
        turn (its content and end-of-turn marker), not the role header the template writes."""
        text = self.render_chat(messages)
        spans = []
        for i in trained:
            before = self._render_or_empty(messages[:i])
            through = self.render_chat(messages[:i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise TokenizerError(
                    f"chat template: rendering the conversation up to message {i} is not a prefix of "
                    "rendering all of it, so the assistant tokens cannot be located "
                    "(the template rewrites earlier turns); "
                    "set completion_only_loss = false to train on every token")
            spans.append((len(before), len(through)))
        return text, spans

    def _render_or_empty(self, messages: list[dict[str, Any]]) -> str:
        """The text before the next turn; "" when there is no earlier turn the template can render."""
        try:
            return self.render_chat(messages, add_generation_prompt=True)
        except TokenizerError:
            if messages:
                raise
            return ""


def _token_text(value) -> str | None:
    """A special token as written in the config files: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return value


_TEMPLATES: dict[str, Any] = {}


def _compiled(source: str):
    """The template compiled once, in a sandbox configured as transformers configures it."""
    if source in _TEMPLATES:
        return _TEMPLATES[source]

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant text with it):
        render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        _TEMPLATES[source] = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template: syntax error on line {e.lineno}: {e.message}") from None
    return _TEMPLATES[source]
