"""megatron-ext: Megatron-style pretraining on megatron-core."""

__version__ = "0.1.0"
