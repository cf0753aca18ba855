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
        "megatron-core>=0.16,<0.17",
        "numpy",
        "sentencepiece",
    ],
    extras_require={
        "hf": ["tokenizers", "transformers", "safetensors"],
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
        # zstandard: .zst corpora (preprocess_data.py asks for it when it meets one).
        "dev": ["pytest", "pyarrow", "tensorboard", "tokenizers", "transformers", "safetensors",
                "zstandard"],
    },
)
