"""`preprocess_data.py`'s flags and dispatch: pretraining text, instruction data or merge mode.

    python preprocess_data.py --input data/*.jsonl --output-prefix out/corpus \\
        --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model tok.model \\
        --append-eod --workers 2

writes `out/corpus_text_document.bin/.idx`. Merge mode:
`python preprocess_data.py --merge --input-prefixes A B --output-prefix C`. Instruction data
(`--handler-name ... --prompt-type ...`) goes through `megatron_ext/data/instruct/`.
"""

import argparse
import sys
from typing import Optional, Sequence

from megatron_ext.data.preprocess import WorkerError, output_prefix_for, preprocess
from megatron_ext.data.instruct.handlers import HANDLERS, handler_name
from megatron_ext.data.instruct.pipeline import OVERLONG, output_prefixes, preprocess_instructions
from megatron_ext.data.instruct.tasks import task_ids_prefix, tasks_path
from megatron_ext.data.instruct.templates import prompt_types
from megatron_ext.tokenizer import add_tokenizer_flags, options_from_args, vocab_size_note


# MindSpeed-LLM's handler of pretraining text: what preprocess_data.py does without a handler
# (each --json-keys text tokenized, EOD with --append-eod).
PRETRAIN_HANDLER = "GeneralPretrainHandler"


def _handler_name(name: str) -> Optional[str]:
    if name.lower() == PRETRAIN_HANDLER.lower():
        return None
    try:
        return handler_name(name)
    except ValueError as error:
        message = str(error).replace("unknown --handler-name ", "unknown name ")
        raise argparse.ArgumentTypeError(message) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize JSONL/JSON/TXT/Parquet text into Megatron indexed datasets.")
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", metavar="PATH",
                       help="files, directories (recursive) or globs: .jsonl, .ndjson, .json, "
                            ".txt (one document per line), each optionally .gz, .bz2, .xz or "
                            ".zst, and .parquet; suffixes in any case")
    group.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                       help="keys (Parquet columns) to tokenize, one output each "
                            "(default: text)")
    group.add_argument("--skip-invalid", action="store_true",
                       help="skip and count malformed records instead of stopping")
    group.add_argument("--split-sentences", action="store_true",
                       help="one sequence per sentence (NLTK punkt, installed with its data): "
                            "writes PREFIX_{key}_sentence")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the newlines between sentences")
    group.add_argument("--lang", default="english",
                       help="punkt model for --split-sentences (default: english)")
    group = parser.add_argument_group("tokenizer")
    add_tokenizer_flags(group)
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's EOD id to every document")
    group = parser.add_argument_group("output and runtime")
    group.add_argument("--output-prefix", required=True,
                       help="writes PREFIX_{key}_document.bin/.idx/.meta.json (merge: "
                            "PREFIX.bin/.idx/.meta.json)")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--partitions", type=int, default=1,
                       help="Megatron-LM's input partitions: document i goes to partition "
                            "i mod N and the output is the partitions in order (the document "
                            "order Megatron-LM writes); the files are the same names as "
                            "without it, no partition file is left")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="with --partitions: contiguous partitions, keeping the input order")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="progress line every N documents (0: none)")
    group = parser.add_argument_group(
        "instruction data (fine-tuning; writes PREFIX_input_ids_document and "
        "PREFIX_loss_mask_document, see docs/finetune.md)")
    group.add_argument("--handler-name", type=_handler_name, metavar="NAME",
                       help=f"read records as conversations in this format: {', '.join(HANDLERS)}"
                            f" or their short forms (Alpaca, Sharegpt, ...; any case); default "
                            f"(or {PRETRAIN_HANDLER}): pretraining text")
    group.add_argument("--prompt-type", metavar="NAME",
                       help=f"chat template: {', '.join(prompt_types())} (hf: the tokenizer's "
                            "chat_template), or a template .json file")
    group.add_argument("--map-keys", metavar="JSON",
                       help="rename the fields a handler reads, e.g. '{\"prompt\": \"question\"}'")
    group.add_argument("--pack", action="store_true",
                       help="pack conversations into samples of --seq-length (+1) tokens")
    group.add_argument("--neat-pack", action="store_true",
                       help="MindSpeed-LLM's: --pack with an attention mask per conversation; "
                            "what --pack writes here (training isolates packed conversations)")
    group.add_argument("--seq-length", type=int, metavar="N",
                       help="the training --seq-length: a sample holds N + 1 tokens")
    group.add_argument("--overwrite-cache", action="store_true",
                       help="MindSpeed-LLM's: rebuild its Hugging Face datasets cache; no effect "
                            "here (the input is read directly, nothing is cached)")
    group.add_argument("--tokenizer-not-use-fast", action="store_true",
                       help="MindSpeed-LLM's slow Hugging Face tokenizer; no effect here: "
                            "tokenizer.json (the fast one) is read, the only one Llama 3 and "
                            "Qwen2.5 ship")
    group.add_argument("--overlong", choices=OVERLONG, default="drop",
                       help="a conversation longer than --seq-length + 1 tokens: drop it "
                            "(default) or truncate it; counted in the summary")
    group = parser.add_argument_group("merge mode")
    group.add_argument("--merge", action="store_true",
                       help="concatenate existing datasets instead of tokenizing")
    group.add_argument("--input-prefixes", nargs="+", metavar="PREFIX",
                       help="datasets to merge, in order (a directory means all its pairs)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        if not args.input_prefixes or args.input:
            parser.error("--merge takes --input-prefixes (and no --input)")
    elif args.input_prefixes:
        parser.error("--input-prefixes is for --merge")
    elif not args.input or not args.tokenizer_type:
        parser.error("--input and --tokenizer-type are required (or --merge)")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.partitions < 1:
        parser.error("--partitions must be at least 1")
    if (args.split_sentences or args.partitions > 1) and (args.handler_name or args.merge):
        parser.error("--split-sentences and --partitions are for pretraining text (not "
                     "--handler-name or --merge)")
    if args.keep_newlines and not args.split_sentences:
        print("note: --keep-newlines has an effect only with --split-sentences, as in "
              "Megatron-LM (documents always keep their newlines)", file=sys.stderr)
    for flag, given in (("--overwrite-cache", args.overwrite_cache),
                        ("--tokenizer-not-use-fast", args.tokenizer_not_use_fast)):
        if given:
            print(f"note: {flag} (MindSpeed-LLM's) has no effect here; see --help",
                  file=sys.stderr)
    note = vocab_size_note(args.tokenizer_type, args.vocab_size) if args.tokenizer_type else None
    if note:
        print(note, file=sys.stderr)
    options = options_from_args(args)
    instruction_flags = [flag for flag, given in (
        ("--prompt-type", args.prompt_type), ("--map-keys", args.map_keys), ("--pack", args.pack),
        ("--neat-pack", args.neat_pack), ("--seq-length", args.seq_length is not None),
        ("--overlong", args.overlong != "drop")) if given]
    if args.handler_name:
        if args.merge or args.append_eod or args.json_keys != ["text"]:
            parser.error("--handler-name (instruction data) takes no --merge, --append-eod or "
                         "--json-keys: the template ends every turn, the handler picks the fields")
        if not args.prompt_type:
            parser.error("--handler-name needs --prompt-type (a chat template)")
        if args.pack and args.seq_length is None:
            parser.error("--pack needs --seq-length (the training --seq-length)")
        if args.neat_pack:
            if not args.pack:
                parser.error("--neat-pack needs --pack (it is the attention of packed samples)")
            print("note: --neat-pack (MindSpeed-LLM's) is what --pack writes here: every packed "
                  "conversation is a sequence of its own, attending to itself alone in "
                  "training", file=sys.stderr)
    elif instruction_flags:
        parser.error(f"{', '.join(instruction_flags)}: only with --handler-name (instruction data)")
    try:
        if args.handler_name:
            summary = preprocess_instructions(
                args.input, args.output_prefix, args.tokenizer_type, args.tokenizer_model,
                args.vocab_size, args.handler_name, args.prompt_type, args.map_keys, args.pack,
                args.seq_length, args.overlong, args.workers, args.log_interval,
                args.skip_invalid, tokenizer_options=options)
            print(summary.report(), file=sys.stderr)
            for prefix in (*output_prefixes(args.output_prefix),
                           task_ids_prefix(args.output_prefix)):
                print(f"wrote {prefix}.bin/.idx/.meta.json", file=sys.stderr)
            print(f"wrote {tasks_path(args.output_prefix)}", file=sys.stderr)
            return
        if args.merge:
            from megatron_ext.data.merge import merge_datasets

            merge_datasets(args.input_prefixes, args.output_prefix, log=sys.stderr)
            return
        summary = preprocess(args.input, args.output_prefix, args.tokenizer_type,
                             args.tokenizer_model, args.vocab_size, args.json_keys,
                             args.append_eod, args.workers, args.log_interval,
                             args.skip_invalid, tokenizer_options=options,
                             partitions=args.partitions,
                             keep_sequential_samples=args.keep_sequential_samples,
                             split_sentences=args.split_sentences,
                             keep_newlines=args.keep_newlines, lang=args.lang)
    except (ValueError, OSError, WorkerError) as e:
        sys.exit(f"error: {e}")
    print(summary.report(), file=sys.stderr)
    for key in args.json_keys:
        prefix = output_prefix_for(args.output_prefix, key, args.split_sentences)
        print(f"wrote {prefix}.bin/.idx/.meta.json", file=sys.stderr)
