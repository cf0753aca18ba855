"""Every chat template renders and masks hand-written conversations exactly.

The character-level tokenizer (conftest) makes every id predictable: the expected renderings are
written out as (text, trained) segments and turned into ids by the oracle ``char_ids``. Only the
assistant turns and their end token are trained on, every turn of a multi-turn conversation.
"""

import json

import numpy as np
import pytest

from megatron_ext.data.instruct.handlers import build_handler
from megatron_ext.data.instruct.pipeline import ConversationEncoder
from megatron_ext.data.instruct.templates import TemplateError, get_template, prompt_types
from megatron_ext.tokenizer import build_tokenizer

from .conftest import BOS, EOS, expected

SYSTEM, Q1, A1, Q2, A2 = "Be brief.", "Hi {x}", "Hello!", "2+2?", "4"
MULTI_TURN = [("system", SYSTEM), ("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2)]

EXPECTED = {
    "chatml": [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi {x}<|im_end|>\n"
         "<|im_start|>assistant\n", 0), ("Hello!<|im_end|>", 1),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0), ("4<|im_end|>", 1),
        ("\n", 0)],
    "qwen": [  # ChatML; the record's system prompt replaces the default one
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi {x}<|im_end|>\n"
         "<|im_start|>assistant\n", 0), ("Hello!<|im_end|>", 1),
        ("\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0), ("4<|im_end|>", 1),
        ("\n", 0)],
    "llama2": [  # <s> and </s> are the tokenizer's BOS/EOS ids ({bos}/{eos})
        ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi {x} [/INST]", 0), ("Hello!</s>", 1),
        ("<s>[INST] 2+2? [/INST]", 0), ("4</s>", 1)],
    "llama3": [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\nHi {x}<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0), ("Hello!<|eot_id|>", 1),
        ("<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", 0), ("4<|eot_id|>", 1)],
    "mftcoder": [  # "<s>" is literal text, which this tokenizer (as Llama's) maps to BOS
        ("<s>system\nBe brief.\n<s>human\nHi {x}\n<s>bot\n", 0), ("Hello!</s>", 1),
        ("\n<s>human\n2+2?\n<s>bot\n", 0), ("4</s>", 1), ("\n", 0)],
}


@pytest.fixture(scope="module")
def tokenizer(char_tokenizer_dir):
    return build_tokenizer("HuggingFaceTokenizer", char_tokenizer_dir)


def _encode(tokenizer, prompt_type, turns):
    ids, mask = ConversationEncoder(tokenizer, prompt_type).encode(turns)
    assert ids.dtype == np.int64 and mask.dtype == np.uint8
    return ids.tolist(), mask.tolist()


@pytest.mark.parametrize("prompt_type", sorted(EXPECTED))
def test_multi_turn_conversation_renders_and_masks_exactly(tokenizer, prompt_type):
    assert _encode(tokenizer, prompt_type, MULTI_TURN) == expected(EXPECTED[prompt_type])


def test_every_builtin_template_is_tested():
    assert sorted(EXPECTED) + ["hf"] == prompt_types()


def test_default_system_prompt_and_no_system(tokenizer):
    turns = [("user", "q"), ("assistant", "a")]
    assert _encode(tokenizer, "qwen", turns) == expected([
        ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nq"
         "<|im_end|>\n<|im_start|>assistant\n", 0), ("a<|im_end|>", 1), ("\n", 0)])
    assert _encode(tokenizer, "llama2", turns) == expected([("<s>[INST] q [/INST]", 0),
                                                            ("a</s>", 1)])
    ids, _ = _encode(tokenizer, "llama2", turns)
    assert ids[0] == BOS and ids[-1] == EOS


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                  "Llama2Tokenizer"])
def test_sentencepiece_templates_use_the_models_bos_and_eos(sp_model, kind):
    """{bos}/{eos} are the model's <s>/</s> (not SentencePieceTokenizer's added <EOD>), and
    text runs get no BOS of their own (Llama2Tokenizer starts documents with one)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    ids, mask = _encode(build_tokenizer(kind, sp_model), "llama2",
                        [("user", "q"), ("assistant", "a")])
    prompt, answer = sp.encode("[INST] q [/INST]"), sp.encode("a")
    assert ids == [sp.piece_to_id("<s>")] + prompt + answer + [sp.piece_to_id("</s>")]
    assert mask == [0] * (1 + len(prompt)) + [1] * (len(answer) + 1)


def test_hf_chat_template_matches_apply_chat_template(tokenizer):
    """``--prompt-type hf``: the ids are transformers' own; the mask covers what each assistant
    message adds to the rendering (its content, end token and the template's newline)."""
    hf = tokenizer.hf_tokenizer
    messages = [{"role": r, "content": c} for r, c in MULTI_TURN]
    reference = hf.apply_chat_template(messages, tokenize=True)
    if not isinstance(reference, list):  # transformers 5 returns a BatchEncoding
        reference = reference["input_ids"]
    ids, mask = _encode(tokenizer, "hf", MULTI_TURN)
    assert ids == list(reference)
    assert (ids, mask) == expected([
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi {x}<|im_end|>\n"
         "<|im_start|>assistant\n", 0), ("Hello!<|im_end|>\n", 1),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", 0), ("4<|im_end|>\n", 1)])


def test_byte_tokenizer_renders_the_template_text(tokenizer):
    """A tokenizer without special tokens sees the template's markers as plain text."""
    byte = build_tokenizer("ByteTokenizer")
    ids, mask = ConversationEncoder(byte, "chatml").encode(MULTI_TURN[1:3])
    prompt = "<|im_start|>user\nHi {x}<|im_end|>\n<|im_start|>assistant\n"
    answer = "Hello!<|im_end|>"
    assert ids.tolist() == list((prompt + answer + "\n").encode())
    assert mask.tolist() == [0] * len(prompt) + [1] * len(answer) + [0]


def test_post_processor_special_tokens_are_not_added_per_piece(tmp_path, char_tokenizer_dir):
    """A tokenizer whose post-processor adds BOS (Llama-3's) gets it from the template only."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(f"{char_tokenizer_dir}/tokenizer.json")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", BOS)])
    directory = tmp_path / "bos_tok"
    directory.mkdir()
    tok.save(str(directory / "tokenizer.json"))
    for name in ("tokenizer_config.json",):
        (directory / name).write_text(open(f"{char_tokenizer_dir}/{name}").read())
    with_bos = build_tokenizer("HuggingFaceTokenizer", str(directory))
    assert with_bos.tokenize("q")[0] == BOS  # what pretraining documents get
    turns = [("user", "q"), ("assistant", "a")]
    assert _encode(with_bos, "llama2", turns) == _encode(
        build_tokenizer("HuggingFaceTokenizer", char_tokenizer_dir), "llama2", turns)


def test_each_format_gives_the_same_conversation(tokenizer):
    """The four handlers read the same two-turn conversation from their own formats."""
    records = {
        "AlpacaStyleInstructionHandler": {"system": SYSTEM, "history": [[Q1, A1]],
                                          "instruction": Q2, "input": "", "output": A2},
        "SharegptStyleInstructionHandler": {"conversations": [
            {"from": "system", "value": SYSTEM}, {"from": "human", "value": Q1},
            {"from": "gpt", "value": A1}, {"from": "human", "value": Q2},
            {"from": "gpt", "value": A2}]},
        "OpenAIStyleInstructionHandler": {"messages": [
            {"role": r, "content": c} for r, c in MULTI_TURN]},
        "MFTCoderStyleInstructionHandler": {"chat_rounds": [
            {"role": {"user": "human", "assistant": "bot"}.get(r, r), "content": c}
            for r, c in MULTI_TURN]},
    }
    encoder = ConversationEncoder(tokenizer, "chatml")
    for name, record in records.items():
        turns = build_handler(name).turns(json.loads(json.dumps(record)))
        assert turns == MULTI_TURN, name
        assert [x.tolist() for x in encoder.encode(turns)] == list(expected(EXPECTED["chatml"]))


def test_template_errors_name_the_flag(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="--prompt-type llama2 uses {bos}, but ByteTokenizer"):
        ConversationEncoder(build_tokenizer("ByteTokenizer"), "llama2")
    with pytest.raises(TemplateError, match="unknown --prompt-type 'vicuna'"):
        get_template("vicuna")
    with pytest.raises(ValueError, match="--prompt-type hf .*ByteTokenizer has none"):
        ConversationEncoder(build_tokenizer("ByteTokenizer"), "hf")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"user": "{content}", "assistant": "{answer}{eos}"}))
    with pytest.raises(TemplateError, match=r"field 'assistant' uses \{answer\}"):
        get_template(str(bad))
    with pytest.raises(TemplateError, match="has no system turn"):
        custom = tmp_path / "nosys.json"
        custom.write_text(json.dumps({"user": "U:{content}\n", "assistant": "A:{content}{eos}"}))
        ConversationEncoder(tokenizer, str(custom)).encode(MULTI_TURN)


def test_custom_template_file(tmp_path, tokenizer):
    custom = tmp_path / "plain.json"
    custom.write_text(json.dumps({"system": "S:{content}\n", "user": "U:{content}\n",
                                  "assistant_prefix": "A:", "assistant": "{content}{eos}",
                                  "assistant_suffix": "\n"}))
    assert _encode(tokenizer, str(custom), MULTI_TURN[:3]) == expected(
        [("S:Be brief.\nU:Hi {x}\nA:", 0), ("Hello!</s>", 1), ("\n", 0)])
