"""Conversations: records → messages → the chat template's text, cut into target and context spans.

The template is rendered with Jinja2 in an immutable sandbox configured as `transformers`
configures it for `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, its `tojson`
and `raise_exception`), so a model's own template renders the same text here as there, and
nothing in a checkpoint directory runs outside the sandbox.

Loss masks come from the template's own output, not from guessing its markup: assistant turn `i`
spans from the end of `render(messages[:i], add_generation_prompt=True)` to the end of
`render(messages[:i + 1])`. That holds for every template that renders a conversation's prefixes
as prefixes of its text; a template that rewrites earlier turns (e.g. drops earlier reasoning)
is refused per record with the reason. Each span is tokenized on its own, so the targets are
exactly the tokens of the assistant spans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ava.config import ChatConfig, DataConfig
from ava.data.errors import DataSourceError
from ava.data.validate import MALFORMED_JSON, RawRecord, Validator

ROLES = ("system", "user", "assistant", "tool")
Message = Dict[str, str]
Segment = Tuple[str, bool]  # (text, is_target)

# Reasons a conversation is skipped; the report and tests use these exact names.
MISSING_MESSAGES = "missing_messages"
MALFORMED_MESSAGE = "malformed_message"
UNKNOWN_ROLE = "unknown_role"
EMPTY_ASSISTANT = "empty_assistant"
NO_ASSISTANT = "no_assistant"
TEMPLATE_ERROR = "template_error"
TOO_LONG = "too_long"  # over seq_len + 1 tokens with data.chat.overlong=drop
CHAT_SKIP_REASONS = (MISSING_MESSAGES, MALFORMED_MESSAGE, UNKNOWN_ROLE, EMPTY_ASSISTANT, NO_ASSISTANT,
                     TEMPLATE_ERROR, TOO_LONG)

# ChatML, the layout of Qwen's and OLMo's instruct templates, for tokenizers without a template.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")  # what transformers passes to templates


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # transformers' override: Jinja's own filter escapes HTML characters
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


class TemplateError(ValueError):
    """The template failed on one conversation (its own `raise_exception`, or not prefix-stable)."""


@dataclass
class ChatTemplate:
    text: str
    origin: str  # the file it came from, or "built-in ChatML"
    special: Dict[str, str]

    def __post_init__(self) -> None:
        import jinja2

        try:
            self._compiled = _environment().from_string(self.text)
        except jinja2.TemplateSyntaxError as exc:
            raise DataSourceError(f"{self.origin}: the chat template does not parse (line {exc.lineno}: "
                                  f"{exc.message})") from exc

    @property
    def identity(self) -> Dict[str, Any]:
        return {"template": self.text, "special": self.special}

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except jinja2.TemplateError as exc:
            raise TemplateError(str(exc)) from exc

    def segments(self, messages: Sequence[Message], train_on: str) -> List[Segment]:
        """The rendered conversation as (text, is_target) spans that concatenate to it."""
        full = self.render(messages)
        if train_on == "all":
            return [(full, True)]
        spans: List[Segment] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            upto = self.render(messages[: i + 1])
            if not full.startswith(upto) or start < done or start > len(upto):
                raise TemplateError(f"the template does not render the conversation up to message {i + 1} as a "
                                    "prefix of the whole, so its assistant span cannot be found; use "
                                    "data.chat.template with a prefix-stable template, or data.train_on=all")
            if start > done:
                spans.append((full[done:start], False))
            spans.append((full[start:len(upto)], True))
            done = len(upto)
        if done < len(full):
            spans.append((full[done:], False))
        return spans


def _token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_template(data_cfg: DataConfig) -> ChatTemplate:
    """data.chat.template, else the tokenizer's own `chat_template`, else the built-in ChatML."""
    special = {"eos_token": data_cfg.tokenizer.eos_token, "pad_token": data_cfg.tokenizer.pad_token}
    beside = (Path(data_cfg.tokenizer.path).expanduser().parent / "tokenizer_config.json"
              if data_cfg.tokenizer.path else None)
    own: Optional[str] = None
    if beside is not None and beside.is_file():
        try:
            config = json.loads(beside.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise DataSourceError(f"{beside}: not readable JSON ({exc})") from exc
        for key in SPECIAL_KEYS:
            token = _token_text(config.get(key))
            if token is not None:
                special[key] = token
        own = config.get("chat_template")
        if isinstance(own, list):  # named templates, as transformers saves several
            named = {entry.get("name"): entry.get("template") for entry in own if isinstance(entry, dict)}
            own = named.get("default")
        if own is None and (beside.parent / "chat_template.jinja").is_file():
            own = (beside.parent / "chat_template.jinja").read_text("utf-8")  # newer transformers' file
            beside = beside.parent / "chat_template.jinja"
    if data_cfg.chat.template:
        path = Path(data_cfg.chat.template).expanduser()
        if not path.is_file():
            raise DataSourceError(f"data.chat.template={data_cfg.chat.template!r} does not exist")
        return ChatTemplate(path.read_text("utf-8"), str(path), special)
    if isinstance(own, str):
        return ChatTemplate(own, str(beside), special)
    return ChatTemplate(DEFAULT_TEMPLATE, "built-in ChatML", special)


def record_maker(cfg: ChatConfig) -> Callable[[object, str], RawRecord]:
    """`(object, location) -> RawRecord` with the conversation in `messages`, or the reason it has none."""

    def make(obj: object, location: str) -> RawRecord:
        if not isinstance(obj, dict):
            return RawRecord(location, reason=MALFORMED_JSON,
                             detail=f"expected a JSON object, got {type(obj).__name__}")
        messages = obj.get(cfg.messages_field)
        if messages is None and obj.get(cfg.prompt_field) is not None \
                and obj.get(cfg.completion_field) is not None:
            messages = [{"role": "user", "content": obj[cfg.prompt_field]},
                        {"role": "assistant", "content": obj[cfg.completion_field]}]
        if messages is None:
            return RawRecord(location, reason=MISSING_MESSAGES,
                             detail=f"no field {cfg.messages_field!r} and no {cfg.prompt_field!r}/"
                                    f"{cfg.completion_field!r} pair")
        return RawRecord(location, messages=messages)

    return make


def check_messages(messages: object) -> Optional[Tuple[str, str]]:
    """(reason, detail) of the first problem of a conversation; None when it can be trained on."""
    if not isinstance(messages, list) or not messages:
        return MISSING_MESSAGES, "the messages are not a non-empty list"
    has_assistant = False
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return MALFORMED_MESSAGE, f"message {number} is not an object with a string 'content'"
        role = message.get("role")
        if role not in ROLES:
            return UNKNOWN_ROLE, f"message {number} has role {role!r}; expected one of {list(ROLES)}"
        if role == "assistant":
            if not message["content"].strip():
                return EMPTY_ASSISTANT, f"message {number} is an empty assistant turn"
            has_assistant = True
    if not has_assistant:
        return NO_ASSISTANT, "the conversation has no assistant turn to learn from"
    return None


def plain(messages: List[Any]) -> List[Message]:
    """Only role and content reach the template (parquet rows may carry null extra fields)."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class ChatValidator(Validator):
    """Checks each conversation and renders it; yields `{location, segments, targets}` rows."""

    def __init__(self, template: ChatTemplate, train_on: str, *, strict: bool, report_examples: int) -> None:
        super().__init__(strict=strict, report_examples=report_examples)
        self.template, self.train_on = template, train_on

    def __call__(self, records: Iterable[RawRecord]) -> Iterator[Dict[str, Any]]:  # type: ignore[override]
        for record in records:
            self.report.read += 1
            if record.reason is not None:
                self._skip(record, record.reason, record.detail)
                continue
            problem = check_messages(record.messages)
            if problem is not None:
                self._skip(record, *problem)
                continue
            try:
                spans = self.template.segments(plain(record.messages), self.train_on)  # type: ignore[arg-type]
            except TemplateError as exc:
                self._skip(record, TEMPLATE_ERROR, f"{self.template.origin}: {exc}")
                continue
            self.report.kept += 1
            yield {"location": record.location, "segments": [text for text, _ in spans],
                   "targets": [flag for _, flag in spans]}
