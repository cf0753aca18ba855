"""MindSpeed-LLM's fine-tuning entry (its tune_* scripts launch `posttrain_gpt.py`): the same
training as pretrain_gpt.py, where `--stage sft --is-instruction-dataset` selects fine-tuning.

    torchrun --nproc_per_node N posttrain_gpt.py --stage sft --is-instruction-dataset ...
"""

from pretrain_gpt import main

if __name__ == "__main__":
    main()
