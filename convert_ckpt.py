"""Convert checkpoints: Hugging Face Llama-family <-> Megatron tp/pp, and Megatron resharding.

    python convert_ckpt.py --model-type GPT --load-model-type hf --save-model-type mg \
        --load-dir HF_DIR --save-dir MG_DIR \
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2 --model-type-hf llama2

See docs/convert.md and ``python convert_ckpt.py --help``.
"""

import sys

from megatron_ext.checkpoint.convert import main

if __name__ == "__main__":
    sys.exit(main())
