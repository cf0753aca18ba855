"""Start-up cost of the layout-invariant initialization (megatron_ext/model/init.py).

Builds a ~1.1B-parameter Llama (TinyLlama's shape: 22 layers, hidden 2048, FFN 5632, 32 heads,
4 KV groups, vocabulary 32000, untied) with ``build_model`` on the CPU and reports the time and
the peak resident memory of the build, next to megatron-core's own per-rank initialization
(``perform_initialization=True``, ``use_cpu_initialization=True``) of the same model. Each case
runs in a fresh process (peak RSS is per process). ``--tp 2`` builds TP rank 0 of 2 in one
process over torch's fake process group (no peer: collectives are no-ops, which building a
model does not need).

    python bench/init_startup.py [--tp 1 2] [--layers 22] [--bf16] [--markdown FILE]
"""

import argparse
import datetime
import json
import os
import platform as host
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VOCAB = 32000


def model_flags(layers: int, bf16: bool, tp: int) -> list:
    flags = (f"--num-layers {layers} --hidden-size 2048 --ffn-hidden-size 5632 "
             f"--num-attention-heads 32 --group-query-attention --num-query-groups 4 "
             f"--seq-length 2048 --position-embedding-type rope --normalization RMSNorm --swiglu "
             f"--disable-bias-linear --untie-embeddings-and-output-weights "
             f"--tensor-model-parallel-size {tp} --mock-data --tokenizer-type NullTokenizer "
             f"--vocab-size {VOCAB - 1} --seed 1234").split()
    return flags + (["--bf16"] if bf16 else [])


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(init: str, tp: int, layers: int, bf16: bool) -> dict:
    """In this process: build the model, return time, peak RSS and parameter sizes."""
    os.environ["MEGATRON_EXT_DEVICE"] = "cpu"
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_ext import platform
    from megatron_ext.checkpoint.args import padded_vocab_size
    from megatron_ext.config import parse_args
    from megatron_ext.model import gpt

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = parse_args(model_flags(layers, bf16, tp), world_size=tp)
    platform.apply()
    if tp == 1:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    else:
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             create_gloo_process_groups=False)
    platform.manual_seed(1234)
    baseline = _rss_mib()
    start = time.perf_counter()
    if init == "ours":
        model = gpt.build_model(config, VOCAB)
    else:  # megatron-core's own initialization, per rank
        core_config = gpt.transformer_config(config)
        core_config.perform_initialization = True
        core_config.use_cpu_initialization = True
        model = gpt.CoreGPTModel(
            config=core_config, transformer_layer_spec=gpt.layer_spec(config, core_config),
            vocab_size=padded_vocab_size(VOCAB, 128, tp), max_sequence_length=2048,
            share_embeddings_and_output_weights=False, position_embedding_type="rope")
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    largest_mib = max(p.numel() * tp * 4 for p in model.parameters()) / 2**20
    peak = _rss_mib()
    return dict(init=init, tp=tp, params=params, seconds=seconds, param_mib=param_mib,
                peak_over_start_mib=peak - baseline, extra_mib=peak - baseline - param_mib,
                largest_full_fp32_mib=largest_mib)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--init", nargs="+", default=["ours", "megatron-core"])
    parser.add_argument("--markdown", help="also write the table, with date and command, here")
    parser.add_argument("--case", nargs=2, metavar=("INIT", "TP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.layers, args.bf16)))
        return
    load = os.getloadavg()[0]
    rows = []
    for tp in args.tp:
        for init in args.init:
            cmd = [sys.executable, os.path.abspath(__file__), "--case", init, str(tp),
                   "--layers", str(args.layers)] + (["--bf16"] if args.bf16 else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    header = ("| init | TP rank | parameters (this rank) | build s | parameter MiB | "
              "peak RSS over start MiB | beyond parameters MiB | largest full tensor fp32 MiB |")
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['init']} | 0 of {r['tp']} | {r['params'] / 1e9:.3f} B | "
                     f"{r['seconds']:.1f} | {r['param_mib']:.0f} | {r['peak_over_start_mib']:.0f} "
                     f"| {r['extra_mib']:.0f} | {r['largest_full_fp32_mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"# Model initialization start-up, CPU\n\n"
                    f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
                    f"- device: {host.processor() or host.machine()}, {os.cpu_count()} cores "
                    f"(shared; load average {load:.1f} at start), "
                    f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}\n"
                    f"- command: `python bench/init_startup.py {' '.join(argv or sys.argv[1:])}`\n"
                    f"- model: {args.layers} layers, hidden 2048, FFN 5632, 32 heads, 4 KV groups, "
                    f"vocabulary {VOCAB}, untied, {'bf16' if args.bf16 else 'fp32'}\n\n"
                    f"{table}\n")


if __name__ == "__main__":
    main()
