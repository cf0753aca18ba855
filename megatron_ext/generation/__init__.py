"""Text generation from Megatron checkpoints: ``generate_gpt.py`` and training's
``--eval-prompts`` (see ``generator.py`` for the decoding loop, ``cli.py`` for the command)."""
