"""Generate text with a Megatron checkpoint (any TP/PP, KV cache): see megatron_ext/generation/cli.py.

    python generate_gpt.py --load CKPT --tokenizer-type T --tokenizer-model M --prompt "Hello"
    torchrun --nproc-per-node 4 generate_gpt.py --load CKPT ... --interactive --prompt-type llama2
"""

import sys

from megatron_ext.generation.cli import main

if __name__ == "__main__":
    sys.exit(main())
