"""docs/megatron-compat.md, generated from the flag data: ``python -m megatron_ext.config.compat
> docs/megatron-compat.md`` (tests/training/test_compat.py checks the committed file)."""

from dataclasses import fields

from megatron_ext.config.components import COMPONENTS
from megatron_ext.config.flags import field_default, flag_name

# Every flag of Megatron-LM's dense GPT/Llama example scripts, core_v0.16.1 through
# core_v0.19.0 (examples/gpt3/train_gpt3_175b_distributed.sh, examples/llama/
# train_llama3_8b_h100_fp8.sh, and examples/mixtral/train_mixtral_8x7b_distributed.sh, whose MoE
# flags are refused), with the scripts that use it. Launcher flags (torchrun's) are left out.
G, L, X = "gpt3", "llama", "mixtral"
SCRIPT_FLAGS = {
    "--adam-beta1": (G, L), "--adam-beta2": (G, L), "--apply-layernorm-1p": (L,),
    "--attention-backend": (G, L), "--attention-dropout": (L, X), "--bf16": (L, X),
    "--calculate-per-token-loss": (L,), "--ckpt-format": (L,), "--clip-grad": (G, L, X),
    "--context-parallel-size": (L,), "--cross-entropy-loss-fusion": (L,),
    "--data-cache-path": (L,), "--data-path": (G, L, X), "--decoupled-lr": (L,),
    "--decoupled-min-lr": (L,), "--disable-bias-linear": (L, X),
    "--distributed-timeout-minutes": (L,), "--empty-unused-memory-level": (L,),
    "--eval-interval": (G, L, X), "--eval-iters": (G, L, X), "--exit-duration-in-mins": (L,),
    "--expert-model-parallel-size": (X,), "--ffn-hidden-size": (L, X), "--fp16": (G,),
    "--fp8-amax-compute-algo": (L,), "--fp8-amax-history-len": (L,), "--fp8-format": (L,),
    "--fp8-param-gather": (L,), "--global-batch-size": (G, L, X),
    "--grad-reduce-in-bf16": (L,), "--group-query-attention": (L, X),
    "--hidden-dropout": (L, X), "--hidden-size": (G, L, X), "--init-method-std": (G, L, X),
    "--kv-channels": (L,), "--load": (G, L, X), "--log-interval": (G, L, X),
    "--log-throughput": (L,), "--lr": (G, L, X), "--lr-decay-iters": (G, X),
    "--lr-decay-samples": (L,), "--lr-decay-style": (G, L, X), "--lr-warmup-fraction": (G,),
    "--lr-warmup-iters": (X,), "--lr-warmup-samples": (L,), "--manual-gc": (L,),
    "--max-position-embeddings": (G, L, X), "--merge-file": (G,),
    "--micro-batch-size": (G, L, X), "--min-lr": (G, L, X), "--mock-data": (L,),
    "--moe-aux-loss-coeff": (X,), "--moe-grouped-gemm": (X,),
    "--moe-router-load-balancing-type": (X,), "--moe-router-topk": (X,),
    "--moe-token-dispatcher-type": (X,), "--no-create-attention-mask-in-dataloader": (L,),
    "--no-load-optim": (X,), "--no-load-rng": (X,), "--no-masked-softmax-fusion": (X,),
    "--no-mmap-bin-files": (L,), "--no-position-embedding": (X,), "--normalization": (L, X),
    "--num-attention-heads": (G, L, X), "--num-experts": (X,), "--num-layers": (G, L, X),
    "--num-query-groups": (L, X), "--num-workers": (L,), "--overlap-grad-reduce": (L, X),
    "--overlap-param-gather": (L, X), "--pipeline-model-parallel-size": (G, L, X),
    "--position-embedding-type": (L, X), "--profile": (L,), "--profile-step-end": (L,),
    "--profile-step-start": (L,), "--rampup-batch-size": (G,), "--rotary-base": (L, X),
    "--rotary-percent": (L,), "--save": (G, L, X), "--save-interval": (G, L, X),
    "--seq-length": (G, L, X), "--sequence-parallel": (L, X), "--split": (G, L, X),
    "--step-batch-size-schedule": (G,), "--swiglu": (L, X),
    "--tensor-model-parallel-size": (G, L, X), "--tensorboard-dir": (G, L, X),
    "--tiktoken-pattern": (L,), "--tokenizer-model": (L, X), "--tokenizer-type": (L, X),
    "--train-iters": (G, X), "--train-samples": (L,),
    "--untie-embeddings-and-output-weights": (L, X), "--use-distributed-optimizer": (L, X),
    "--use-mcore-models": (L, X), "--vocab-file": (G,), "--vocab-size": (L,),
    "--wandb-exp-name": (X,), "--wandb-project": (X,), "--weight-decay": (G, L, X),
}

# Every flag of MindSpeed-LLM's dense Llama-family example scripts (examples/mcore/: llama2/
# pretrain_llama2_13b_ptd.sh, _pack_ptd.sh and _pack_ptd_o2.sh; llama3/pretrain_llama3_8b_ptd.sh, _pack_ptd.sh,
# tune_llama3_8b_full_ptd.sh, tune_llama3_8b_lora_ptd.sh, before their removal in 331add6b;
# qwen25/pretrain_qwen25_72b_32k_ptd.sh, _4k_pack.sh, tune_qwen25_72b_4k_full_ptd.sh and
# _lora_ptd.sh), launched with `python -m torch.distributed.launch` (which adds --local-rank).
M2, M3, M3F, M3L = "ms-llama2", "ms-llama3", "ms-llama3-full", "ms-llama3-lora"
Q, QF, QL = "ms-qwen25", "ms-qwen25-full", "ms-qwen25-lora"
ALL = (M2, M3, M3F, M3L, Q, QF, QL)
MINDSPEED_SCRIPT_FLAGS = {
    "--adam-beta1": ALL, "--adam-beta2": ALL, "--add-qkv-bias": (Q, QF, QL),
    "--attention-dropout": ALL, "--attention-softmax-in-fp32": ALL, "--bf16": ALL,
    "--ckpt-format": (M2, Q, QF, QL), "--clip-grad": ALL, "--coc-fused-kernel": (Q,),
    "--context-parallel-algo": (Q,), "--context-parallel-size": (Q,), "--data-path": ALL,
    "--disable-bias-linear": ALL, "--distributed-backend": ALL,
    "--enable-hf2mg-convert": (M2, Q, QF, QL), "--eval-interval": ALL, "--eval-iters": ALL,
    "--exit-on-missing-checkpoint": (Q,), "--ffn-hidden-size": ALL,
    "--finetune": (M3F, M3L, QF, QL), "--global-batch-size": ALL,
    "--group-query-attention": (M3, M3F, M3L, Q, QF, QL), "--handler-name": (M2, Q, QF, QL),
    "--hidden-dropout": ALL, "--hidden-size": ALL, "--high-freq-factor": (M3F, M3L),
    "--init-method-std": ALL, "--initial-loss-scale": ALL,
    "--is-instruction-dataset": (M3F, M3L, QF, QL), "--load": ALL, "--log-interval": ALL,
    "--log-throughput": (M2, Q, QF, QL), "--lora-alpha": (M3L, QL), "--lora-fusion": (M3L, QL),
    "--lora-r": (M3L, QL), "--lora-target-modules": (M3L, QL), "--low-freq-factor": (M3F, M3L),
    "--lr": ALL, "--lr-decay-style": ALL, "--lr-warmup-fraction": (M2, M3, Q, QF, QL),
    "--make-vocab-size-divisible-by": ALL, "--max-position-embeddings": ALL,
    "--micro-batch-size": ALL, "--min-lr": (M2, M3, Q, QF, QL), "--model-type-hf": (M2, Q, QF, QL),
    "--no-gradient-accumulation-fusion": ALL, "--no-load-optim": ALL, "--no-load-rng": ALL,
    "--no-masked-softmax-fusion": ALL, "--no-pad-to-seq-lengths": (M3F, M3L, QF, QL),
    "--no-save-optim": (QF, QL), "--no-save-rng": (QF, QL), "--no-shared-storage": (Q,),
    "--no-shuffle": (QL,), "--norm-epsilon": (M3, M3F, M3L, Q, QF, QL), "--normalization": ALL,
    "--num-attention-heads": ALL, "--num-layer-list": (Q,), "--num-layers": ALL,
    "--num-layers-per-virtual-pipeline-stage": (M2, Q),
    "--num-query-groups": (M3, M3F, M3L, Q, QF, QL),
    "--o2-gradient": (M2,), "--o2-optimizer": (M2,),
    "--original-max-position-embeddings": (M3F, M3L), "--overlap-grad-reduce": (M2, M3, Q, QF, QL),
    "--overlap-param-gather": (M2, M3, Q, QF), "--padded-samples": (QF, QL),
    "--padded-vocab-size": (M3F, M3L, Q, QF, QL), "--pipeline-model-parallel-size": ALL,
    "--position-embedding-type": ALL, "--prompt-type": (M3F, M3L, QF, QL),
    "--recompute-activation-function": (M2, M3, Q, QF),
    "--recompute-activation-function-num-layers": (M3,), "--recompute-granularity": (M2, QF),
    "--recompute-method": (M2, QF), "--recompute-num-layers": (M2, QF),
    "--reset-attention-mask": (M2, M3, Q), "--reuse-fp32-param": (M2, Q, QF, QL),
    "--rope-scaling-factor": (M3F, M3L), "--rope-scaling-type": (M3F, M3L),
    "--rotary-base": (M3, M3F, M3L, Q, QF, QL), "--rotary-percent": (M3F, M3L), "--save": ALL,
    "--save-interval": ALL, "--seed": (M3F, M3L, Q, QF, QL), "--seq-length": ALL,
    "--sequence-parallel": ALL, "--split": ALL, "--stage": (M3F, M3L, QF, QL),
    "--swap-attention": (Q, QF), "--swiglu": ALL, "--tensor-model-parallel-size": ALL,
    "--tokenizer-name-or-path": ALL, "--tokenizer-not-use-fast": (M3F, M3L, QF, QL),
    "--tokenizer-type": ALL, "--train-iters": ALL, "--transformer-impl": ALL,
    "--untie-embeddings-and-output-weights": ALL, "--use-ascend-coc": (Q,),
    "--use-ascend-mc2": (QL,), "--use-distributed-optimizer": (M2, M3, Q, QF, QL),
    "--use-flash-attn": ALL, "--use-fused-rmsnorm": (M2, M3, Q, QF, QL),
    "--use-fused-rotary-pos-emb": (M2, M3, Q, QF, QL), "--use-fused-swiglu": (M2, M3, Q, QF, QL),
    "--use-mcore-models": ALL, "--use-rotary-position-embeddings": (M3, M3F, M3L, Q),
    "--vocab-size": (M3F, M3L), "--weight-decay": ALL,
    "--local-rank": ALL,
}

# The flags of their preprocess_data.py scripts (data_convert_{llama2,llama3,qwen25}_pretrain.sh,
# _pretrain_pack.sh, _instruction.sh): (scripts, what preprocess_data.py does with it).
DP, DI = "ms-data-pretrain", "ms-data-instruction"
MINDSPEED_PREPROCESS_FLAGS = {
    "--input": ((DP, DI), "honoured (their Parquet included)"),
    "--tokenizer-type": ((DP, DI), "honoured (PretrainedFromHF: the Hugging Face tokenizer)"),
    "--tokenizer-name-or-path": ((DP, DI), "honoured (alias of --tokenizer-model)"),
    "--output-prefix": ((DP, DI), "honoured: PREFIX_text_document, or the instruction shards"),
    "--json-keys": ((DP,), "honoured"),
    "--append-eod": ((DP,), "honoured"),
    "--workers": ((DP, DI), "honoured"),
    "--log-interval": ((DP, DI), "honoured"),
    "--handler-name": ((DP, DI), "honoured: GeneralPretrainHandler is pretraining text (as "
                       "without a handler); the instruction handlers as MindSpeed-LLM's"),
    "--prompt-type": ((DI,), "honoured (llama2, llama3, qwen, ...)"),
    "--map-keys": ((DI,), "honoured"),
    "--seq-length": ((DI,), "honoured: longer conversations are dropped (or --overlong "
                     "truncate)"),
    "--overwrite-cache": ((DI,), "no-op (said once): nothing is cached"),
    "--tokenizer-not-use-fast": ((DI,), "no-op (said once): tokenizer.json (the fast "
                                 "tokenizer) is read"),
}

# Where the same flag deliberately does something else here: (flag, Megatron-LM, ours, why).
DIFFERENCES = [
    ("--make-vocab-size-divisible-by (padded vocabulary rows)",
     "the padding rows of the output layer take part in the softmax",
     "the same padding; the padded rows' logits are -inf in the loss (their gradients zero), "
     "so the loss is the same at every TP and a converted HF model's loss is transformers'",
     "padding is a layout detail and should not change the loss"),
    ("--seed (initial weights)", "each rank draws its own shard (seed + 100 x stage, TP ranks "
     "offset), so the initial model depends on the layout",
     "each parameter drawn at full size from (seed, its full-model name), local shard kept",
     "the same run in every layout gives the same loss curve (README: reproducibility)"),
    ("--tokenizer-type GPT2BPETokenizer", "megatron-core's (default) turns a literal "
     "<|endoftext|> in a document into EOD", "GPT-2's BPE via the tokenizers package, ids equal "
     "to transformers' GPT2Tokenizer; <|endoftext|> text stays text; EOD = <|endoftext|>",
     "a string in web text must not end a document"),
    ("--tokenizer-type TikTokenizer", "megatron-core's encodes with allowed_special='all'",
     "encode_ordinary; megatron-core's id layout (special tokens 0..N-1), EOD </s>, defaults "
     "v2 and N = 1000; reads Megatron-LM's JSON rank list or a .tiktoken file",
     "as above; .tiktoken is the format OpenAI's models ship in"),
    ("--vocab-size with HuggingFaceTokenizer (and other file tokenizers)", "ignored silently",
     "ignored, with one note", "a user who expects it to act learns that it does not"),
    ("preprocess_data.py --partitions N", "partition input files and datasets left beside "
     "the input/output; --workers a multiple of N",
     "the same round-robin order and final names; partitions are temporary datasets removed "
     "whatever happens; any --workers", "no leftovers, no second copy of the corpus"),
    ("preprocess_data.py --split-sentences", "downloads punkt at run time; with one partition "
     "a first run only writes a split copy of the input",
     "never downloads (a missing NLTK/punkt is an error naming the flag); one run, no copy",
     "machines without network; a download per worker would race"),
    ("megatron-core version", "each Megatron-LM release pins its own",
     "0.16 through 0.19 (0.17+ need Python >= 3.12 or pip --ignore-requires-python; 0.18+ "
     "need triton); CI runs the suite on 0.16.1 and a core subset plus a 0.16 -> 0.19 "
     "checkpoint resume on 0.19.2", "users' clusters carry whichever release NGC ships"),
    ("--data-cache-path on several nodes", "indices built by rank 0; a node that cannot see "
     "them fails inside megatron-core", "the same build; every rank checks it sees rank 0's "
     "files and all stop with one error naming the flag (docs/multinode.md)",
     "a node-local cache must not fail obscurely"),
    ("--profile", "nsys (CUDA profiler range) unless --use-pytorch-profiler",
     "always the torch profiler, rank 0, trace in --tensorboard-dir (else ./profile)",
     "runs on CPU and GPU alike, no nsys needed"),
    ("--attention-backend", "auto|flash|fused|unfused|local (Transformer Engine or local)",
     "ours auto|flash|te|torch|sdpa; fused -> auto, unfused/local -> sdpa, logged",
     "our core attention is document-aware (varlen); Transformer Engine is not wired yet"),
    ("--cross-entropy-loss-fusion", "megatron-core's fused cross entropy",
     "the same on a GPU; on CPU the unfused cross entropy, said once",
     "the fused kernel is compiled by torch.compile, over a minute per process on a CPU"),
    ("--step-batch-size-schedule with --global-batch-size",
     "0.19 refuses the pair (its own gpt3 script passes both)",
     "accepted when --global-batch-size equals the schedule's last size",
     "so that the example script runs as written"),
    ("--rampup-batch-size", "megatron-core 0.19 ignores it (deprecated)",
     "honoured on every megatron-core version, with 0.16's rule",
     "the schedule is computed here, not by megatron-core's version-specific calculator"),
    ("--num-workers", "default 2", "default 2 with a GPU, 0 without",
     "on a CPU the workers compete with training for the same cores"),
    ("--train-iters / --train-samples", "no default: without either, training fails",
     "neither given: 10 iterations", "short runs (tests, smoke checks) need no schedule flags"),
    ("resume with other LR-schedule flags (--lr, --train-iters, --global-batch-size, ...)",
     "refused (megatron-core's assertion) unless --override-opt_param-scheduler or "
     "--use-checkpoint-opt_param-scheduler",
     "the checkpoint's schedule is followed (with --override-opt_param-scheduler this run's), "
     "and a warning names each value that differs",
     "runs that resumed so before keep working; the change of curve is said, not silent"),
    ("--sequence-parallel with packed documents",
     "(no packed-document attention in the local spec)",
     "micro-batch x seq-length tokens must divide by TP", "packed micro-batches are one row"),
]

_STATUS_TEXT = {"honoured": "honoured", "no-op": "no-op (said once)",
                "warned": "warned and disabled", "refused": "refused", "ours": "ours"}


def _flag_data():
    data = {}
    for component, cls in COMPONENTS.items():
        for f in fields(cls):
            data[flag_name(f)] = (component, f)
            for alias in f.metadata.get("aliases", ()):
                data[alias] = (component, f)
    return data


def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def _flag_rows(script_flags, data):
    rows = []
    for name in sorted(script_flags):
        _, f = data[name]
        meta = f.metadata
        status = _STATUS_TEXT.get(meta.get("status", "honoured"), meta.get("status"))
        default = field_default(f)
        default = "" if default is None or isinstance(default, bool) or default == [] else default
        rows.append(f"| `{name}` | {', '.join(script_flags[name])} | {status} | "
                    f"{_cell(default)} | {_cell(meta.get('note', ''))} |")
    return rows


def render() -> str:
    data = _flag_data()
    lines = [
        "# Megatron-LM compatibility",
        "",
        "Generated by `python -m megatron_ext.config.compat > docs/megatron-compat.md` from the",
        "flag data in `megatron_ext/config/` (a test checks that this file is current).",
        "`pretrain_gpt.py --help` lists every flag with its description and default.",
        "",
        "## Flags of Megatron-LM's example scripts",
        "",
        "Every flag of `examples/gpt3/train_gpt3_175b_distributed.sh`, "
        "`examples/llama/train_llama3_8b_h100_fp8.sh` and",
        "`examples/mixtral/train_mixtral_8x7b_distributed.sh` (core_v0.16.1 to core_v0.19.0).",
        "Statuses: *honoured* (Megatron-LM's meaning), *no-op* (selects what is always done "
        "here; said once on rank 0),",
        "*warned* (warned and disabled, as Megatron-LM does), *refused* (a one-line error with "
        "the way out).",
        "",
        "| flag | scripts | status | default | note |",
        "|---|---|---|---|---|",
    ]
    lines += _flag_rows(SCRIPT_FLAGS, data)
    lines += [
        "", "## Flags of MindSpeed-LLM's example scripts", "",
        "Every flag of its dense Llama-family scripts (examples/mcore/llama2, llama3, qwen25: "
        "pretrain_*, tune_*_full_*, tune_*_lora_*),",
        "each accepted as below (tests/training/test_mindspeed_flags.py); the llama2 pretrain "
        "script runs unchanged (test_mindspeed_script.py). Their no-ops pick an Ascend kernel "
        "or memory layout",
        "that leaves the numbers unchanged; `--distributed-backend nccl` needs a GPU, as "
        "everywhere here. Their tune_* scripts launch",
        "`posttrain_gpt.py`: the same entry as `pretrain_gpt.py` (`--stage sft "
        "--is-instruction-dataset` fine-tunes).", "",
        "| flag | scripts | status | default | note |", "|---|---|---|---|---|"]
    lines += _flag_rows(MINDSPEED_SCRIPT_FLAGS, data)
    lines += ["", "Their `preprocess_data.py` scripts (data_convert_*_pretrain*.sh, "
              "data_convert_*_instruction.sh):", "",
              "| flag | scripts | here |", "|---|---|---|"]
    lines += [f"| `{name}` | {', '.join(scripts)} | {_cell(text)} |"
              for name, (scripts, text) in sorted(MINDSPEED_PREPROCESS_FLAGS.items())]
    lines += ["", "## Deliberate differences from Megatron-LM", "",
              "| flag | Megatron-LM | here | why |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(_cell(c) for c in row)} |" for row in DIFFERENCES]
    lines += ["", "## Other flags", "",
              "Accepted flags beyond those scripts (Megatron-LM's unless marked ours):", ""]
    others = sorted(n for n in data if n not in SCRIPT_FLAGS and n not in MINDSPEED_SCRIPT_FLAGS)
    for name in others:
        _, f = data[name]
        mark = " (ours)" if f.metadata.get("status") == "ours" else ""
        lines.append(f"- `{name}`{mark}: {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
