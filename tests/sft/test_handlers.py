"""Handlers: records of each format -> turns, --map-keys, and what a bad record is told."""

import pytest

from megatron_ext.data.instruct.handlers import HANDLERS, build_handler, handler_name

ALPACA = "AlpacaStyleInstructionHandler"
SHAREGPT = "SharegptStyleInstructionHandler"
OPENAI = "OpenAIStyleInstructionHandler"
MFTCODER = "MFTCoderStyleInstructionHandler"


def test_alpaca_joins_instruction_and_input_and_reads_history():
    turns = build_handler(ALPACA).turns({
        "instruction": "Translate", "input": "chat", "output": "cat",
        "history": [["hi", "hello"], ["again", "sure"]]})
    assert turns == [("user", "hi"), ("assistant", "hello"), ("user", "again"),
                     ("assistant", "sure"), ("user", "Translate\nchat"), ("assistant", "cat")]
    # input and system are optional; an empty or null one is left out
    assert build_handler(ALPACA).turns({"instruction": "q", "output": "a", "input": None,
                                        "system": ""}) == [("user", "q"), ("assistant", "a")]


def test_sharegpt_top_level_system_and_roles():
    turns = build_handler(SHAREGPT).turns({"system": "S", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    assert turns == [("system", "S"), ("user", "q"), ("assistant", "a")]


def test_map_keys_rename_fields_and_tags():
    alpaca = build_handler(ALPACA, '{"prompt": "question", "response": "answer"}')
    assert alpaca.turns({"question": "q", "answer": "a"}) == [("user", "q"), ("assistant", "a")]
    sharegpt = build_handler(SHAREGPT, {"messages": "dialog", "tags": {
        "role_tag": "speaker", "content_tag": "text", "user_tag": "U", "assistant_tag": "A"}})
    record = {"dialog": [{"speaker": "U", "text": "q"}, {"speaker": "A", "text": "a"}]}
    assert sharegpt.turns(record) == [("user", "q"), ("assistant", "a")]


@pytest.mark.parametrize("map_keys, message", [
    ("{not json", "--map-keys is not valid JSON"),
    ('["prompt"]', "--map-keys must be a JSON object"),
    ('{"question": "q"}', "--map-keys: unknown key 'question'"),
    ('{"tags": {"speaker": "x"}}', "--map-keys: 'tags' takes an object"),
    ('{"prompt": 3}', "--map-keys: 'prompt' must name a field"),
])
def test_bad_map_keys(map_keys, message):
    name = SHAREGPT if "tags" in map_keys else ALPACA
    with pytest.raises(ValueError, match=message):
        build_handler(name, map_keys)


def test_unknown_handler():
    with pytest.raises(ValueError, match="unknown --handler-name 'Foo'; choose one of Alpaca"):
        build_handler("Foo")


@pytest.mark.parametrize("given, full", [
    ("Alpaca", ALPACA), ("alpaca", ALPACA), ("Sharegpt", SHAREGPT), ("ShareGPT", SHAREGPT),
    ("OpenAI", OPENAI), ("openai", OPENAI), ("MFTCoder", MFTCODER),
    ("sharegptstyleinstructionhandler", SHAREGPT), (OPENAI, OPENAI),
])
def test_short_and_any_case_names(given, full):
    # The README's short forms name MindSpeed-LLM's handlers; the reader is the same one.
    assert handler_name(given) == full
    assert type(build_handler(given)) is HANDLERS[full][0]


def test_unknown_handler_lists_real_and_short_names():
    with pytest.raises(ValueError) as error:
        handler_name("Sharegpt4")
    for full in HANDLERS:
        assert full in str(error.value)
    assert "short forms Alpaca, Sharegpt, OpenAI, MFTCoder" in str(error.value)


@pytest.mark.parametrize("name, record, message", [
    (ALPACA, {"instruction": "q"}, "no key 'output'"),
    (ALPACA, {"instruction": "q", "output": "  "}, "key 'output': empty assistant turn"),
    (ALPACA, {"instruction": 3, "output": "a"}, "key 'instruction' is int, not a string"),
    (ALPACA, {"instruction": "q", "output": "a", "history": [["x"]]},
     r"history\[0\] is not a \[question, answer\] pair"),
    (ALPACA, {"instruction": "q", "output": "a", "history": "x"}, "not a list of"),
    (ALPACA, ["q", "a"], "expected a JSON object, got list"),
    (SHAREGPT, {"messages": []}, "no key 'conversations'"),
    (SHAREGPT, {"conversations": "hi"}, "key 'conversations' is str, not a list"),
    (SHAREGPT, {"conversations": []}, "empty conversation"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "q"}]},
     r"conversations\[0\]: the conversation ends with a user turn"),
    (SHAREGPT, {"conversations": [{"from": "gpt", "value": "a"}]},
     r"conversations\[0\]: expected a user turn, got assistant"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "q"},
                                  {"from": "human", "value": "q"}]},
     r"conversations\[1\]: expected an assistant turn, got user"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
     r"conversations\[1\]: empty assistant turn"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     r"conversations\[1\]: unknown role 'bot'; known: 'human' \(user\), 'gpt'"),
    (SHAREGPT, {"conversations": [{"from": "human"}]}, r"no key 'value' in conversations\[0\]"),
    (SHAREGPT, {"conversations": [{"from": "human", "value": ["q"]}]},
     r"key 'value' in conversations\[0\] is list, not a string"),
    (SHAREGPT, {"conversations": ["q"]}, r"conversations\[0\] is str, not an object"),
    (OPENAI, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                           {"role": "system", "content": "s"}]},
     r"messages\[2\]: a system turn is allowed only first"),
    (OPENAI, {"system": "s", "messages": [{"role": "system", "content": "s"}]},
     r"messages\[0\]: a system message and a 'system' key"),
    (MFTCODER, {"chat_rounds": [{"role": "user", "content": "q"}]}, "unknown role 'user'"),
])
def test_bad_records_say_what_is_wrong(name, record, message):
    with pytest.raises(ValueError, match=message):
        build_handler(name).turns(record)


@pytest.mark.parametrize("name, record, reader", [
    (SHAREGPT, {"instruction": "q", "input": "", "output": "a"}, ALPACA),
    (ALPACA, {"conversations": [{"from": "human", "value": "q"}]}, SHAREGPT),
    (OPENAI, {"chat_rounds": [], "data_name": "t"}, MFTCODER),
    (MFTCODER, {"messages": []}, OPENAI),
])
def test_a_record_of_another_format_names_its_handler(name, record, reader):
    """The common mistake (Alpaca records given to the ShareGPT handler, ...): the error
    names the handler that reads them."""
    with pytest.raises(ValueError, match=f"no key .*; these are {reader} records: "
                       f"--handler-name {reader[:-len('StyleInstructionHandler')]}"):
        build_handler(name).turns(record)


def test_a_record_missing_a_field_of_its_own_format_gets_no_format_hint():
    with pytest.raises(ValueError) as error:
        build_handler(ALPACA).turns({"instruction": "q"})
    assert "these are" not in str(error.value)
