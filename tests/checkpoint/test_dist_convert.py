"""convert_ckpt.py and torch_dist: HF <-> torch_dist and torch <-> torch_dist are lossless."""

from megatron_ext.checkpoint import format as fmt
from megatron_ext.checkpoint.dist_format import is_dist_checkpoint
from tests.checkpoint.conftest import hf_state_dict, run_convert
from tests.checkpoint.test_convert import assert_same_tensors, load_megatron
from tests.launcher import launch
from tests.training.test_dist_checkpoint import _loaded_weights

# The model flags of conftest.make_hf_model's Llama (vocabulary 250 = NullTokenizer's 249 + EOD).
TINY_LLAMA = (
    "--num-layers 4 --hidden-size 64 --ffn-hidden-size 160 --num-attention-heads 4 "
    "--group-query-attention --num-query-groups 2 --swiglu --normalization RMSNorm "
    "--norm-epsilon 1e-6 --position-embedding-type rope --rotary-base 50000 "
    "--disable-bias-linear --untie-embeddings-and-output-weights --seq-length 16 "
    "--max-position-embeddings 2048 --mock-data --tokenizer-type NullTokenizer --vocab-size 249 "
    "--micro-batch-size 1 --train-iters 1"
).split()


def test_hf_to_torch_dist_and_back_is_exact(hf_llama, tmp_path):
    dist = run_convert("hf", "mg", hf_llama, tmp_path / "dist", "--ckpt-format", "torch_dist")
    assert fmt.read_tracker(dist) == 1
    assert is_dist_checkpoint(fmt.iteration_dir(dist, 1))
    back = run_convert("mg", "hf", dist, tmp_path / "hf")
    assert_same_tensors(hf_state_dict(hf_llama), hf_state_dict(back))
    # megatron-core's own loader reads it, here at TP=2 in the trainer: the weights of HF -> torch.
    direct = load_megatron(run_convert("hf", "mg", hf_llama, tmp_path / "direct"))[0][(0, 0)]
    argv = (TINY_LLAMA + ["--load", str(dist), "--finetune", "--tensor-model-parallel-size", "2",
                          "--make-vocab-size-divisible-by", "64"])
    assert_same_tensors(launch(_loaded_weights, 2, argv, 2)[0][0], direct)


def test_torch_to_torch_dist_and_back_is_exact(hf_llama_tied, tmp_path):
    """torch TP=2 x PP=2 -> torch_dist -> torch TP=1: the same tensors as HF -> torch TP=1."""
    sharded = run_convert("hf", "mg", hf_llama_tied, tmp_path / "tp2pp2",
                          "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    dist = run_convert("mg", "mg", sharded, tmp_path / "dist", "--ckpt-format", "torch_dist")
    back = run_convert("mg", "mg", dist, tmp_path / "tp1")
    direct = run_convert("hf", "mg", hf_llama_tied, tmp_path / "direct")
    (back_shards, back_args, _), (direct_shards, _, _) = load_megatron(back), load_megatron(direct)
    assert back_args.tensor_model_parallel_size == 1 and back_args.num_layers == 4
    assert_same_tensors(back_shards[(0, 0)], direct_shards[(0, 0)])
