"""Instruction record formats: a record (one JSON object) -> conversation turns.

Handlers (MindSpeed-LLM's names, ``--handler-name``) read a record into turns
``[(role, content)]``, role system|user|assistant, and check that they form a trainable
conversation; ``--map-keys`` (JSON) renames the fields they read. A bad record is a
ValueError that says which field is wrong; the caller adds the file and line.
"""

import json
from typing import List, Optional, Sequence

from megatron_ext.data.instruct.templates import Turn


def _missing(record: dict, key: str, what: str = "") -> ValueError:
    """The error for a record without ``key``: its keys, and for a record of another format
    (Alpaca given to the ShareGPT handler, ...) the --handler-name that reads it."""
    keys = ", ".join(map(str, record)) or "none"
    hint = ""
    if not what:  # a top-level key: the record's format is in question
        for name, (_, defaults) in HANDLERS.items():
            wanted = ([defaults["prompt"], defaults["response"]] if "prompt" in defaults
                      else [defaults["messages"]])
            if all(k in record for k in wanted):
                hint = (f"; these are {name} records: --handler-name "
                        f"{name[:-len(_SUFFIX)]}, or --map-keys to rename the fields")
                break
    return ValueError(f"no key {key!r}{what} (keys: {keys}){hint}")


def _text(record: dict, key: str, required: bool, what: str = "") -> Optional[str]:
    if key not in record:
        if required:
            raise _missing(record, key, what)
        return None
    value = record[key]
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"key {key!r}{what} is {type(value).__name__}, not a string")
    return value


def check_turns(turns: List[Turn], names: Sequence[str]) -> List[Turn]:
    """Validate a conversation: an optional system turn first, then user/assistant alternating,
    ending with a non-empty assistant turn. ``names[i]`` says where turn i came from."""
    if not turns:
        raise ValueError("empty conversation")
    expected = "user"
    for i, (role, content) in enumerate(turns):
        if role == "system":
            if i != 0:
                raise ValueError(f"{names[i]}: a system turn is allowed only first")
            continue
        if role != expected:
            article = "an" if expected == "assistant" else "a"
            raise ValueError(f"{names[i]}: expected {article} {expected} turn, got {role} (turns "
                             "must alternate user/assistant, starting with user)")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{names[i]}: empty assistant turn")
        expected = "assistant" if role == "user" else "user"
    if turns[-1][0] != "assistant":
        raise ValueError(f"{names[-1]}: the conversation ends with a {turns[-1][0]} turn; it "
                         "must end with an assistant turn (nothing to train on otherwise)")
    return turns


class AlpacaHandler:
    """Alpaca: ``instruction`` (+ ``input``, joined by a newline) -> ``output``, with optional
    ``system`` and ``history`` (earlier exchanges as ``[[question, answer], ...]``).
    ``--map-keys`` keys (MindSpeed-LLM's): prompt, query, response, system, history."""

    defaults = {"prompt": "instruction", "query": "input", "response": "output",
                "system": "system", "history": "history"}

    def __init__(self, keys: dict):
        self.keys = keys

    def turns(self, record) -> List[Turn]:
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        k = self.keys
        prompt = _text(record, k["prompt"], True)
        query = _text(record, k["query"], False)
        response = _text(record, k["response"], True)
        system = _text(record, k["system"], False)
        turns, names = [], []
        if system:
            turns.append(("system", system))
            names.append(f"key {k['system']!r}")
        history = record.get(k["history"])
        if history is not None:
            if not isinstance(history, list):
                raise ValueError(f"key {k['history']!r} is {type(history).__name__}, not a list "
                                 "of [question, answer] pairs")
            for i, pair in enumerate(history):
                where = f"{k['history']}[{i}]"
                if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                        or not all(isinstance(x, str) for x in pair)):
                    raise ValueError(f"{where} is not a [question, answer] pair of strings")
                turns += [("user", pair[0]), ("assistant", pair[1])]
                names += [f"{where}[0]", f"{where}[1]"]
        user = f"{prompt}\n{query}" if query else prompt
        turns += [("user", user), ("assistant", response)]
        names += [f"key {k['prompt']!r}", f"key {k['response']!r}"]
        return check_turns(turns, names)


class MessagesHandler:
    """A list of messages (ShareGPT ``conversations``, OpenAI ``messages``, MFTCoder
    ``chat_rounds``), each a dict with a role and a content. ``--map-keys`` keys: messages,
    system (an optional top-level system prompt), tags: {role_tag, content_tag, user_tag,
    assistant_tag, system_tag} (MindSpeed-LLM's)."""

    def __init__(self, keys: dict):
        self.keys = keys
        tags = keys["tags"]
        self.roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant",
                      tags["system_tag"]: "system"}

    def turns(self, record) -> List[Turn]:
        if not isinstance(record, dict):
            raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        key, tags = self.keys["messages"], self.keys["tags"]
        if key not in record:
            raise _missing(record, key)
        messages = record[key]
        if not isinstance(messages, list):
            raise ValueError(f"key {key!r} is {type(messages).__name__}, not a list of messages")
        turns, names = [], []
        system = _text(record, self.keys["system"], False)
        if system:
            turns.append(("system", system))
            names.append(f"key {self.keys['system']!r}")
        for i, message in enumerate(messages):
            where = f"{key}[{i}]"
            if not isinstance(message, dict):
                raise ValueError(f"{where} is {type(message).__name__}, not an object")
            role = _text(message, tags["role_tag"], True, f" in {where}")
            content = _text(message, tags["content_tag"], True, f" in {where}")
            if role not in self.roles:
                known = ", ".join(f"{tag!r} ({name})" for tag, name in self.roles.items())
                raise ValueError(f"{where}: unknown role {role!r}; known: {known} (rename with "
                                 "--map-keys '{\"tags\": {...}}')")
            if self.roles[role] == "system" and system and i == 0:
                raise ValueError(f"{where}: a system message and a {self.keys['system']!r} key; "
                                 "give one")
            turns.append((self.roles[role], content))
            names.append(where)
        return check_turns(turns, names)


def _messages_defaults(messages: str, role: str, content: str, user: str, assistant: str):
    return {"messages": messages, "system": "system",
            "tags": {"role_tag": role, "content_tag": content, "user_tag": user,
                     "assistant_tag": assistant, "system_tag": "system"}}


HANDLERS = {
    "AlpacaStyleInstructionHandler": (AlpacaHandler, AlpacaHandler.defaults),
    "SharegptStyleInstructionHandler": (
        MessagesHandler, _messages_defaults("conversations", "from", "value", "human", "gpt")),
    "OpenAIStyleInstructionHandler": (
        MessagesHandler, _messages_defaults("messages", "role", "content", "user", "assistant")),
    "MFTCoderStyleInstructionHandler": (
        MessagesHandler, _messages_defaults("chat_rounds", "role", "content", "human", "bot")),
}


_SUFFIX = "StyleInstructionHandler"


def handler_name(name: str) -> str:
    """MindSpeed-LLM's handler name for ``name``: the full name or its short form (``Alpaca``,
    ``sharegpt``, ``OpenAI``, ``MFTCoder``), case-insensitively; a ValueError lists them."""
    wanted = name.lower()
    for full in HANDLERS:
        if wanted in (full.lower(), full[:-len(_SUFFIX)].lower()):
            return full
    short = ", ".join(full[:-len(_SUFFIX)] for full in HANDLERS)
    raise ValueError(f"unknown --handler-name {name!r}; choose one of {', '.join(HANDLERS)} "
                     f"(or the short forms {short}, any case)")


def build_handler(name: str, map_keys=None):
    """The handler ``--handler-name`` names (see ``handler_name``), with ``--map-keys`` (a JSON
    string or dict) applied over its defaults; a ValueError names the flag."""
    name = handler_name(name)
    cls, defaults = HANDLERS[name]
    keys = json.loads(json.dumps(defaults))
    if map_keys:
        if isinstance(map_keys, str):
            try:
                map_keys = json.loads(map_keys)
            except json.JSONDecodeError as e:
                raise ValueError(f"--map-keys is not valid JSON ({e.msg}): {map_keys}") from None
        if not isinstance(map_keys, dict):
            raise ValueError("--map-keys must be a JSON object")
        for key, value in map_keys.items():
            if key not in keys:
                raise ValueError(f"--map-keys: unknown key {key!r} for {name}; known: "
                                 f"{', '.join(keys)}")
            if key == "tags":
                if not isinstance(value, dict) or set(value) - set(keys["tags"]):
                    raise ValueError(f"--map-keys: 'tags' takes an object with "
                                     f"{', '.join(keys['tags'])}")
                keys["tags"].update(value)
            elif not isinstance(value, str):
                raise ValueError(f"--map-keys: {key!r} must name a field (a string)")
            else:
                keys[key] = value
    return cls(keys)
