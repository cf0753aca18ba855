"""examples/slurm_pretrain.sh without SLURM: `srun` and `scontrol` are small stand-ins on PATH
(srun runs its command once per node with that node's SLURM_NODEID, as srun
--ntasks-per-node=1 does), and a stand-in `python` prints what it would run, so the torchrun
command each node gets through the real training script is checked flag by flag."""

import os
import shlex
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "slurm_pretrain.sh")


def _stand_in(directory, name, body):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_slurm_example_is_valid_bash():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_slurm_env_becomes_each_nodes_torchrun_flags(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: drop its own options, then run the task once per node.
    _stand_in(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
              'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@"; done\n')
    _stand_in(bin_dir, "scontrol", '[[ "$*" == "show hostnames gpu[07-08]" ]] && '
              'printf "gpu07\\ngpu08\\n"\n')
    _stand_in(bin_dir, "python", 'if [[ "$1" == -m ]]; then echo "RUN $*"; fi\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu[07-08]",
               SLURM_NNODES="2", SLURM_GPUS_ON_NODE="4", SLURM_SUBMIT_DIR=ROOT,
               DATA_PATH="/shared/corpus_text_document", TOKENIZER_MODEL="/shared/tok.model")
    for name in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK", "NPROC_PER_NODE",
                 "TRAIN_SCRIPT"):
        env.pop(name, None)
    result = subprocess.run(["bash", SCRIPT, "--train-iters", "7"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    runs = [shlex.split(line)[1:] for line in result.stdout.splitlines()
            if line.startswith("RUN ")]
    assert len(runs) == 2
    for node_rank, argv in enumerate(runs):
        assert argv[:2] == ["-m", "torch.distributed.run"]
        flags = dict(zip(argv[2:12:2], argv[3:12:2]))
        assert flags == {"--nproc_per_node": "4", "--nnodes": "2",
                         "--node_rank": str(node_rank), "--master_addr": "gpu07",
                         "--master_port": "29500"}
        assert argv[12] == "pretrain_gpt.py"
        assert argv[-2:] == ["--train-iters", "7"]  # the job's own flags come last
        assert "/shared/corpus_text_document" in argv


def test_slurm_example_outside_slurm_says_how_to_run_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "run under SLURM: sbatch" in result.stderr
