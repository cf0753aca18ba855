"""Data and tokenizer flags (Megatron-LM's ``data and dataloader`` and ``tokenizer`` groups)."""

from dataclasses import dataclass
from typing import List, Optional

from megatron_ext.config.flags import NO_OP, OURS, flag
from megatron_ext.tokenizer import TokenizerOptions


@dataclass
class DataConfig:
    GROUP = "data and dataloader"

    # The datasets: one blend cut by --split, or whole datasets per split (config/blend.py).
    data_path: List[str] = flag(
        [], "Datasets cut into train/valid/test by --split: a shard prefix, weight/prefix "
        "pairs (0.3 A 0.7 B) or prefixes (A B: weighed by their sizes, one epoch of each).",
        nargs="+")
    data_args_path: Optional[str] = flag(
        None, "A file holding the --data-path list (whitespace-separated), for long blends.")
    train_data_path: Optional[List[str]] = flag(
        None, "Datasets of the training split, used whole (the forms of --data-path).",
        nargs="*")
    valid_data_path: Optional[List[str]] = flag(
        None, "Datasets of the validation split, used whole (the forms of --data-path).",
        nargs="*")
    multiple_validation_sets: bool = flag(
        False, "Evaluate each --valid-data-path dataset separately, a loss per set "
        "(validation-0, validation-1, ...); the list takes no weights. Each set reads "
        "--eval-iters global batches per evaluation, continuing where it stopped (Megatron-LM "
        "accepts the flag only with --full-validation, not available here).",
        group="validation")
    validation_set_names: Optional[List[str]] = flag(
        None, "Names of the --multiple-validation-sets, one per --valid-data-path dataset, "
        "instead of their indices (validation-wiki, not validation-0).", group="validation",
        nargs="+")
    test_data_path: Optional[List[str]] = flag(
        None, "Datasets of the test split, used whole (the forms of --data-path).", nargs="*")
    per_split_data_args_path: Optional[str] = flag(
        None, "A JSON file {\"train\": [...], \"valid\": [...], \"test\": [...]} holding the "
        "--train/--valid/--test-data-path lists (a list, a string or null each).")
    split: str = flag("969,30,1", "Train,valid,test proportions of the data, e.g. 949,50,1 "
                      "(--data-path's; refused with per-split datasets, as megatron-core).",
                      note="quoted values (the scripts' \"--split '99,1,0'\") accepted")
    mock_data: bool = flag(False, "Synthetic data (megatron-core's MockGPTDataset).")
    data_cache_path: Optional[str] = flag(
        None, "Directory for the dataset index caches and shard scans; unset: data_cache under "
        "--save, else .cache/data_cache in the working directory.",
        note="default: one folder beside the run, never beside each shard as megatron-core's")
    num_workers: Optional[int] = flag(
        None, "DataLoader worker processes per rank (0: load in the training process); "
        "unset: 2 with a GPU, as Megatron-LM, 0 without.",
        note="default 2 with a GPU, 0 without")
    mmap_bin_files: bool = flag(
        True, "Read .bin shards without memory-mapping them.", name="--no-mmap-bin-files",
        action="store_false")
    create_attention_mask_in_dataloader: bool = flag(
        True, "Do not build a dense attention mask per sample.",
        name="--no-create-attention-mask-in-dataloader", action="store_false", status=NO_OP,
        note="never built here: causal and document masks live in the attention kernel")
    reset_position_ids: bool = flag(
        False, "Positions restart after each EOD; packed documents attend only to themselves "
        "(variable-length attention).")
    reset_attention_mask: bool = flag(
        False, "Packed documents attend only to themselves (variable-length attention; no "
        "dense mask).")
    eod_mask_loss: bool = flag(False, "No loss on EOD tokens.")
    # Fine-tuning on instruction shards (PREFIX_input_ids/loss_mask_document): see
    # megatron_ext/training/sft_dataset.py and docs/finetune.md.
    is_instruction_dataset: bool = flag(
        False, "Train on instruction shards from preprocess_data.py --handler-name (answer-only "
        "loss, packed conversations).", status=OURS)

    tokenizer_type: Optional[str] = flag(None, "Tokenizer (as preprocess_data.py's).",
                                         group="tokenizer")
    tokenizer_model: Optional[str] = flag(
        None, "Tokenizer model file or directory.", group="tokenizer",
        aliases=("--tokenizer-name-or-path",))
    vocab_size: Optional[int] = flag(None, "Vocabulary size (NullTokenizer).",
                                     group="tokenizer")
    # GPT2BPETokenizer's files and TikTokenizer's layout (megatron_ext/tokenizer/).
    vocab_file: Optional[str] = flag(None, "GPT2BPETokenizer: the GPT-2 vocab.json.",
                                     group="tokenizer")
    merge_file: Optional[str] = flag(None, "GPT2BPETokenizer: the GPT-2 merges.txt.",
                                     group="tokenizer")
    tiktoken_pattern: Optional[str] = flag(
        None, "TikTokenizer: the pre-tokenization pattern, v1 or v2 (unset: v2).",
        group="tokenizer", choices=["v1", "v2"])
    tiktoken_num_special_tokens: int = flag(
        1000, "TikTokenizer: ids reserved for special tokens ahead of the BPE ranks.",
        group="tokenizer")
    tokenizer_special_tokens: Optional[List[str]] = flag(
        None, "TikTokenizer: the special tokens, in id order (Megatron-LM's defaults: <unk> "
        "<s> </s> ...).", group="tokenizer", nargs="+", aliases=("--tiktoken-special-tokens",))

    def tokenizer_options(self) -> TokenizerOptions:
        """The flags only some tokenizer types read, for ``build_tokenizer``."""
        return TokenizerOptions(
            self.vocab_file, self.merge_file, self.tiktoken_pattern,
            self.tiktoken_num_special_tokens,
            tuple(self.tokenizer_special_tokens) if self.tokenizer_special_tokens else None)
