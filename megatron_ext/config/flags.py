"""Flags as data: each config field carries its help, argparse details and Megatron-LM status.

``flag(...)`` declares a dataclass field together with everything argparse, ``--help`` and
docs/megatron-compat.md need; ``build_parser`` turns the component dataclasses into argument
groups named as Megatron-LM's (``network size``, ``training``, ``learning rate``, ...).
"""

import argparse
import difflib
from dataclasses import MISSING, field, fields
from typing import List, Optional, get_args

# How a Megatron-LM flag is treated here (the compat table's "status" column).
HONOURED = "honoured"
NO_OP = "no-op"          # accepted, selects what is always done here; said once
WARNED = "warned"        # accepted, warned about and disabled, as Megatron-LM does
REFUSED = "refused"      # accepted by the parser, refused by validate with the way out
OURS = "ours"            # not a Megatron-LM flag (MindSpeed-LLM's or this project's)


def flag(default=None, help: str = "", *, group: Optional[str] = None, status: str = HONOURED,
         note: str = "", name: Optional[str] = None, aliases=(), **argparse_kwargs):
    """A dataclass field with its flag: ``help`` and ``note`` (the compat table's remark) are
    text; ``name`` overrides the flag derived from the field (``--no-mmap-bin-files``);
    ``argparse_kwargs`` go to ``add_argument`` (``choices``, ``nargs``, ``action``...)."""
    metadata = dict(help=help, group=group, status=status, note=note, name=name,
                    aliases=tuple(aliases), argparse=argparse_kwargs)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag_name(f) -> str:
    return f.metadata.get("name") or "--" + f.name.replace("_", "-")


def field_default(f):
    return f.default_factory() if f.default is MISSING else f.default


def unquote(value: str) -> str:
    """Strip one pair of matching quotes: Megatron-LM's scripts write ``"--split '99,1,0'"`` in
    arrays expanded unquoted, so the quotes reach the program."""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _scalar_type(annotation):
    inner = [a for a in get_args(annotation) if a is not type(None)] or [annotation]
    inner = get_args(inner[0]) or inner  # List[int] -> int
    for typ in (bool, int, float):
        if inner[0] is typ:
            return typ
    return unquote


def _option_strings(f) -> list:
    return [flag_name(f), *f.metadata.get("aliases", ())]


def _add_argument(group, f) -> None:
    meta = f.metadata
    kwargs = dict(dest=f.name, default=None, **meta.get("argparse", {}))
    typ = _scalar_type(f.type)
    if typ is bool:
        kwargs.setdefault("action", "store_true")
    elif "type" not in kwargs:
        kwargs["type"] = typ
    default = field_default(f)
    text = meta.get("help", "")
    if typ is not bool and default is not None:
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default: {shown})"
    kwargs["help"] = text.replace("%", "%%")
    group.add_argument(*_option_strings(f), **kwargs)


# Megatron-LM's argument groups, in its --help order.
GROUPS = ("network size", "regularization", "training", "initialization", "learning rate",
          "checkpointing", "mixed precision", "distributed", "validation", "tokenizer",
          "data and dataloader", "logging", "transformer-engine", "moe", "lora",
          "mindspeed-llm")


def flags_by_group(components):
    """{group title: [field, ...]} in Megatron-LM's group order."""
    groups = {title: [] for title in GROUPS}
    for cls in components:
        for f in fields(cls):
            groups[f.metadata.get("group") or cls.GROUP].append(f)
    return groups


def build_parser_from(components, extra_args_provider=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Megatron-style GPT pretraining on megatron-core", allow_abbrev=False)
    # An entry script's own flags first: where one has a component flag's name (generate_gpt.py's
    # --prompt-type is the chat template it renders, MindSpeed-LLM's a training no-op), the
    # script's meaning is the one that applies there.
    if extra_args_provider is not None:
        extra_args_provider(parser)
    taken = set(known_flags(parser))
    for title, group_fields in flags_by_group(components).items():
        group = parser.add_argument_group(title)
        for f in group_fields:
            if not taken.intersection(_option_strings(f)):
                _add_argument(group, f)
    return parser


def known_flags(parser: argparse.ArgumentParser) -> List[str]:
    return sorted(s for action in parser._actions for s in action.option_strings)


def describe_unknown(parser: argparse.ArgumentParser, unknown: List[str]) -> str:
    """One line: each unknown flag with the closest known one."""
    known = known_flags(parser)
    parts = []
    for arg in unknown:
        if not arg.startswith("-"):
            continue  # the value of an unknown flag
        name = arg.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    if not parts:
        return f"unexpected value(s) {' '.join(unknown)}: each value must follow its flag"
    return (f"unrecognized arguments: {', '.join(parts)}; see pretrain_gpt.py --help and "
            "docs/megatron-compat.md")
