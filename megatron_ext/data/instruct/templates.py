"""Chat templates as data: conversation turns -> text pieces, each marked trained or not.

The templates live in ``templates.json`` beside this module (``--prompt-type NAME``); a path to
a JSON file holding one template object (the same fields) works too. ``--prompt-type hf`` is
not rendered here: it is the tokenizer's own ``chat_template`` (``megatron_ext.data.instruct.pipeline``).

A conversation renders as::

    prefix
    system turn: system.format(content), or folded into the first user turn via
                 system_in_first_user (Llama-2), or nothing (no system, no default_system)
    per exchange: user   assistant_prefix   assistant   assistant_suffix
                  (0)    (0)                (1)         (0)          1 = trained on

so every assistant turn, with the end token its ``assistant`` field carries, is trained on and
nothing else is. Placeholders: ``{content}``, ``{system}`` (``system_in_first_user`` only),
``{bos}`` and ``{eos}``; the last two are the tokenizer's BOS and EOS (EOD) *ids*, never text.
Everything else is literal text, contents included (a ``{`` in a user's message is just text).
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

HF_PROMPT_TYPE = "hf"
TEMPLATES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates.json")

FIELDS = ("prefix", "system", "system_in_first_user", "default_system", "user",
          "assistant_prefix", "assistant", "assistant_suffix")
# Which placeholders each field may (and, for the second set, must) use.
_ALLOWED = {
    "prefix": ({"bos"}, set()),
    "system": ({"content", "bos", "eos"}, {"content"}),
    "system_in_first_user": ({"content", "system", "bos", "eos"}, {"content", "system"}),
    "default_system": (set(), set()),
    "user": ({"content", "bos", "eos"}, {"content"}),
    "assistant_prefix": ({"bos"}, set()),
    "assistant": ({"content", "eos"}, {"content"}),
    "assistant_suffix": ({"bos", "eos"}, set()),
}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
SPECIALS = ("bos", "eos")


@dataclass(frozen=True)
class Special:
    """A special token by role (``bos`` or ``eos``): the tokenizer supplies its id."""

    name: str


Piece = Union[str, Special]
Turn = Tuple[str, str]  # (role: system|user|assistant, content)


class TemplateError(ValueError):
    """A template that cannot work; the message names --prompt-type."""


@dataclass(frozen=True)
class Template:
    name: str
    description: str = ""
    prefix: str = ""
    system: Optional[str] = None
    system_in_first_user: Optional[str] = None
    default_system: Optional[str] = None
    user: str = "{content}"
    assistant_prefix: str = ""
    assistant: str = "{content}{eos}"
    assistant_suffix: str = ""

    @property
    def specials(self) -> set:
        """The special tokens this template emits (``bos``, ``eos``)."""
        used = set()
        for name in FIELDS:
            value = getattr(self, name)
            if value:
                used.update(p for p in _PLACEHOLDER.findall(value) if p in SPECIALS)
        return used

    @property
    def stop(self) -> Optional[str]:
        """The text that ends an assistant turn before any ``{eos}`` (chatml's ``<|im_end|>``):
        where a generated answer stops; None when only the EOS token (or whitespace) ends it."""
        tail = self.assistant.split("{content}", 1)[1].split("{eos}", 1)[0]
        return tail if tail.strip() else None

    def render(self, turns: Sequence[Turn]) -> List[Tuple[Piece, bool]]:
        """``[(piece, trained)]`` for a valid conversation: an optional leading system turn,
        then user/assistant turns alternating, ending with an assistant turn."""
        pieces: List[Tuple[Piece, bool]] = []
        turns = list(turns)
        system = self.default_system
        if turns and turns[0][0] == "system":
            system = turns.pop(0)[1]
        self._emit(pieces, self.prefix, False, {})
        fold = None
        if system is not None:
            if self.system is not None:
                self._emit(pieces, self.system, False, {"content": [system]})
            elif self.system_in_first_user is not None:
                fold = system
            else:
                raise TemplateError(f"--prompt-type {self.name} has no system turn, but the "
                                    "conversation has a system message")
        for role, content in turns:
            if role == "user":
                value: List[Piece] = [content]
                if fold is not None:
                    value = [p for p, _ in self._fill(self.system_in_first_user,
                                                      {"system": [fold], "content": [content]})]
                    fold = None
                self._emit(pieces, self.user, False, {"content": value})
                self._emit(pieces, self.assistant_prefix, False, {})
            else:
                self._emit(pieces, self.assistant, True, {"content": [content]})
                self._emit(pieces, self.assistant_suffix, False, {})
        return pieces

    @staticmethod
    def _fill(fmt: str, values: Dict[str, List[Piece]]) -> List[Tuple[Piece, bool]]:
        out, position = [], 0
        for match in _PLACEHOLDER.finditer(fmt):
            if match.start() > position:
                out.append((fmt[position:match.start()], False))
            name = match.group(1)
            if name in SPECIALS:
                out.append((Special(name), False))
            else:
                out.extend((v, False) for v in values[name])
            position = match.end()
        if position < len(fmt):
            out.append((fmt[position:], False))
        return out

    def _emit(self, pieces, fmt: str, trained: bool, values) -> None:
        if fmt:
            pieces.extend((piece, trained) for piece, _ in self._fill(fmt, values)
                          if not (isinstance(piece, str) and piece == ""))


def _check(name: str, spec: dict) -> Template:
    if not isinstance(spec, dict):
        raise TemplateError(f"--prompt-type {name}: a template is a JSON object of "
                            f"{', '.join(FIELDS)}")
    unknown = set(spec) - set(FIELDS) - {"description"}
    if unknown:
        raise TemplateError(f"--prompt-type {name}: unknown field(s) "
                            f"{', '.join(sorted(unknown))}; known: {', '.join(FIELDS)}")
    for field in ("user", "assistant"):
        if not isinstance(spec.get(field), str):
            raise TemplateError(f"--prompt-type {name}: field {field!r} (a string) is required")
    for field, value in spec.items():
        if field == "description" or value is None:
            continue
        if not isinstance(value, str):
            raise TemplateError(f"--prompt-type {name}: field {field!r} must be a string or "
                                f"null, got {type(value).__name__}")
        allowed, required = _ALLOWED[field]
        used = set(_PLACEHOLDER.findall(value))
        if used - allowed:
            raise TemplateError(
                f"--prompt-type {name}: field {field!r} uses "
                f"{', '.join('{' + p + '}' for p in sorted(used - allowed))}; it may use "
                f"{', '.join('{' + p + '}' for p in sorted(allowed)) or 'no placeholder'}")
        if required - used:
            raise TemplateError(f"--prompt-type {name}: field {field!r} needs "
                                f"{', '.join('{' + p + '}' for p in sorted(required - used))}")
    if spec.get("system") is not None and spec.get("system_in_first_user") is not None:
        raise TemplateError(f"--prompt-type {name}: set 'system' or 'system_in_first_user', "
                            "not both")
    return Template(name=name, **spec)


def builtin_templates() -> Dict[str, Template]:
    with open(TEMPLATES_FILE, encoding="utf-8") as f:
        specs = json.load(f)
    return {name: _check(name, spec) for name, spec in specs.items() if not name.startswith("_")}


def prompt_types() -> List[str]:
    """Every ``--prompt-type`` name: the built-in templates and ``hf``."""
    return sorted(builtin_templates()) + [HF_PROMPT_TYPE]


def get_template(prompt_type: str) -> Template:
    """The template for ``--prompt-type`` (a built-in name or a JSON file with one template)."""
    builtin = builtin_templates()
    if prompt_type in builtin:
        return builtin[prompt_type]
    if prompt_type.endswith(".json") and os.path.isfile(prompt_type):
        try:
            with open(prompt_type, encoding="utf-8") as f:
                spec = json.load(f)
        except json.JSONDecodeError as e:
            raise TemplateError(f"--prompt-type {prompt_type}: invalid JSON ({e})") from None
        return _check(prompt_type, spec)
    raise TemplateError(f"unknown --prompt-type {prompt_type!r}; choose one of "
                        f"{', '.join(prompt_types())} or give a template .json file")
