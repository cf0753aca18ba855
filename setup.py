from setuptools import find_packages, setup

setup(
    name="megatron-ext",
    version="0.1.0",
    description="Megatron-style LLM pretraining on megatron-core: TP/PP/SP/DP, varlen attention, "
    "Megatron-compatible data shards and checkpoints.",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_ext", "megatron_ext.*"]),
    # Chat templates and the built-in instruction set (docs/finetune.md) are data.
    package_data={"megatron_ext.data.instruct": ["templates.json", "builtin_instructions.jsonl"]},
    py_modules=["preprocess_data", "pretrain_gpt", "convert_ckpt", "generate_gpt"],
    install_requires=[
        # Loose on purpose: a pre-installed torch (e.g. the 2.13.0 CPU build) must be kept,
        # a tighter pin would pull several GB of CUDA wheels.
        "torch>=2.6",
        # 0.16 through 0.19 (megatron_ext/platform/ checks each). 0.17+ declare Python >= 3.12
        # (on 3.11 pip picks 0.16.x) and 0.18+ import triton at `import megatron.core`.
        "megatron-core>=0.16,<0.20",
        "numpy",
        "sentencepiece",
        # megatron-core's dist_checkpointing (--ckpt-format torch_dist, the default) imports it
        # to watch its writer processes.
        "psutil",
        # megatron-core's hierarchical CP groups (--hierarchical-context-parallel-sizes, for
        # --cp-comm-type a2a+p2p) are built with it.
        "einops",
        # --tensorboard-dir works out of the box (about 60 MB with grpcio and protobuf).
        "tensorboard",
    ],
    extras_require={
        # tokenizers: HuggingFaceTokenizer and GPT2BPETokenizer; tiktoken: TikTokenizer.
        "hf": ["tokenizers", "transformers", "safetensors", "tiktoken"],
        # preprocess_data.py --split-sentences (plus NLTK's punkt_tab data, installed once).
        "text": ["nltk"],
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
        # python -m megatron_ext.plot (loss curves as PNG); training does not need it.
        "plot": ["matplotlib"],
        # zstandard: .zst corpora (preprocess_data.py asks for it when it meets one); peft: the
        # LoRA export test (it adds accelerate, no other torch).
        "dev": ["pytest", "pyarrow", "matplotlib", "tokenizers", "transformers", "safetensors",
                "zstandard", "tiktoken", "nltk", "peft"],
    },
)
