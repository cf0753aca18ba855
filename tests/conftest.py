import os

import pytest
import torch

# The suite runs on the CPU with gloo even on a GPU machine: forked ranks cannot share one GPU.
os.environ["MEGATRON_EXT_DEVICE"] = "cpu"

# Ranks are forked from the pytest process (tests/launcher.py); a parent that never starts an
# OpenMP thread pool cannot leave one half-copied in a child. One thread also keeps CPU results
# independent of the machine's core count.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tmp_cwd(tmp_path_factory):
    """The module's tests run in a temporary working directory: a run without --save keeps its
    dataset caches under .cache/ there (config.validate), not in the repository."""
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp("cwd")
        patch.chdir(directory)
        yield directory


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """A one-rank gloo process group for the module: megatron-core's BlendedDataset asks for the
    rank whenever it has a cache path (it always has one here, see config.validate)."""
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
