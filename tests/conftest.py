import os

import torch

# The suite runs on the CPU with gloo even on a GPU machine: forked ranks cannot share one GPU.
os.environ["MEGATRON_EXT_DEVICE"] = "cpu"

# Ranks are forked from the pytest process (tests/launcher.py); a parent that never starts an
# OpenMP thread pool cannot leave one half-copied in a child. One thread also keeps CPU results
# independent of the machine's core count.
torch.set_num_threads(1)
