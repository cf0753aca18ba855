"""The data's checks, part of ``validate``: one source of datasets (a --data-path blend cut by
--split, the datasets of each split, or --mock-data) with its lists read and checked,
--multiple-validation-sets, instruction data, the loader and the tokenizer flags."""

from megatron_ext import platform
from megatron_ext.config import blend
from megatron_ext.config.blend import SPLITS
from megatron_ext.config.components import Config, require


def validate_data(config: Config) -> None:
    """The data flags: instruction data, sequence parallelism over packed rows, the one source
    of datasets, --split, the loader and the tokenizer."""
    d, t, m, p = config.data, config.training, config.model, config.parallel
    tp = p.tensor_model_parallel_size
    if d.is_instruction_dataset:
        require(not d.mock_data, "--is-instruction-dataset reads instruction shards from "
                 "--data-path PREFIX (preprocess_data.py --handler-name ...); it cannot be used "
                 "with --mock-data")
        require(bool(d.data_path or d.data_args_path), "--is-instruction-dataset needs "
                 "--data-path PREFIX (the "
                 "--output-prefix of preprocess_data.py --handler-name ...)")
        require(not d.eod_mask_loss, "--eod-mask-loss cannot be used with "
                 "--is-instruction-dataset: the loss mask comes from the data (assistant turns "
                 "and their end tokens)")
    if p.sequence_parallel:
        # SP splits each micro-batch's sequence over TP ranks; packed (varlen) micro-batches are
        # one row of micro-batch x seq-length tokens.
        if config.varlen:
            require((t.micro_batch_size * m.seq_length) % tp == 0,
                     f"--sequence-parallel with packed documents splits --micro-batch-size "
                     f"{t.micro_batch_size} x --seq-length {m.seq_length} tokens over "
                     f"--tensor-model-parallel-size {tp}: make it divisible")
        else:
            require(m.seq_length % tp == 0,
                     f"--sequence-parallel splits --seq-length {m.seq_length} over "
                     f"--tensor-model-parallel-size {tp}: make it divisible")
    _validate_data_sources(config)
    split = d.split.replace("/", ",").split(",")
    require(all(s.strip().replace(".", "", 1).isdigit() for s in split) and len(split) <= 3,
             f"--split {d.split!r}: expected up to three numbers like 949,50,1")
    # megatron-core divides by the sum (0,0,0 is a ZeroDivisionError there) and returns no
    # training dataset for a zero first part (a TypeError at the first batch).
    require(float(split[0]) > 0, f"--split {d.split!r}: the training split (first number) is "
             "empty")
    if d.num_workers is None:
        # Megatron-LM's 2 overlap loading with GPU work; on a CPU they compete for its cores.
        d.num_workers = 2 if platform.cuda_available() else 0
    require(d.num_workers >= 0, f"--num-workers {d.num_workers}: must be >= 0")
    if "create_attention_mask_in_dataloader" in config.given:
        config.notices.append("--no-create-attention-mask-in-dataloader: no effect (no dense "
                              "attention mask is ever built here)")
    require(d.tokenizer_type is not None, "--tokenizer-type is required" + (
        "; with --vocab-file (GPT-2's files) pass --tokenizer-type GPT2BPETokenizer"
        if d.vocab_file else ""))
    if d.tokenizer_type == "NullTokenizer":
        require(d.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    elif d.tokenizer_type == "GPT2BPETokenizer":
        require(d.vocab_file is not None and d.merge_file is not None,
                 "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    else:
        require(d.tokenizer_type == "ByteTokenizer" or d.tokenizer_model is not None,
                 f"--tokenizer-type {d.tokenizer_type} needs --tokenizer-model")


def _validate_data_sources(config: Config) -> None:
    """One source of datasets, as Megatron-LM allows, and its lists well formed."""
    d, given = config.data, config.given
    one = [f for f, on in (("--data-path", d.data_path), ("--data-args-path", d.data_args_path))
           if on]
    per_split = [f"--{s}-data-path" for s in SPLITS if f"{s}_data_path" in given]
    per_split_file = ["--per-split-data-args-path"] if d.per_split_data_args_path else []
    mock = ["--mock-data"] if d.mock_data else []
    sources = one + per_split + per_split_file + mock
    require(bool(sources), "no data: give --data-path PREFIX... (cut by --split), the datasets "
             "of each split (--train-data-path/--valid-data-path/--test-data-path), or "
             "--mock-data")
    require(len(one) < 2 and not (per_split and per_split_file),
             f"{' and '.join(sources)}: the file holds the same lists as the flags; give one")
    require(bool(one) + bool(per_split or per_split_file) + bool(mock) == 1,
             f"{', '.join(sources)}: give one source of data (Megatron-LM's \"a single data "
             f"source\"): one blend cut by --split, the datasets of each split, or --mock-data")
    blends = blend.resolve(d)  # the lists checked now (files read), before any process group
    _validate_validation_sets(config, blends)
    if d.mock_data:
        return
    if blends.blend is not None and "split" not in given:  # Megatron-LM warns alike
        config.notices.append(f"{one[0]} without --split: cut by the legacy default "
                              f"{d.split} (train, valid, test)")
    if blends.per_split is not None:
        flags = " ".join(per_split + per_split_file)
        require("split" not in given, f"--split {d.split} with {flags}: each split's datasets "
                "are used whole (megatron-core: split and blend_per_split are incompatible); "
                "drop --split, or give one --data-path blend to cut by it")
        require(blends.per_split[0] is not None, f"{flags}: no training datasets; give "
                "--train-data-path (or a train list in --per-split-data-args-path)")
        require(not d.is_instruction_dataset, f"{flags} with --is-instruction-dataset: "
                "per-split instruction datasets are not supported; give them to --data-path "
                "and cut the splits with --split")


def _validate_validation_sets(config: Config, blends: blend.Blends) -> None:
    """--multiple-validation-sets: a loss per dataset of the validation split's own list."""
    d = config.data
    names = d.validation_set_names
    require(names is None or d.multiple_validation_sets, "--validation-set-names names the "
            "datasets of --multiple-validation-sets; add that flag, or drop the names")
    if not d.multiple_validation_sets:
        return
    require(not d.is_instruction_dataset, "--multiple-validation-sets with "
            "--is-instruction-dataset: instruction data is one --data-path blend cut by "
            "--split, with no validation datasets of its own; drop --multiple-validation-sets")
    valid = blends.per_split[1] if blends.per_split else None
    require(valid is not None, "--multiple-validation-sets evaluates each --valid-data-path "
            "dataset on its own; give the validation datasets with --valid-data-path (or a "
            "valid list in --per-split-data-args-path), not a --data-path blend or --mock-data")
    prefixes, weights = valid
    require(weights is None, f"{blends.flags[1]} with --multiple-validation-sets: each dataset "
            f"is evaluated on its own, so the list takes no weights (as Megatron-LM); give the "
            f"prefixes alone: {' '.join(prefixes)}")
    require(names is None or len(names) == len(prefixes), f"--validation-set-names: "
            f"{len(names or [])} names for the {len(prefixes)} datasets of {blends.flags[1]}; "
            "give one name per dataset")
