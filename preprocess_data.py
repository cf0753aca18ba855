"""Megatron-style offline preprocessing: see megatron_ext/data/preprocess.py and docs/preprocess.md."""

from megatron_ext.data.cli import main

if __name__ == "__main__":
    main()
