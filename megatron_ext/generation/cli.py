"""``generate_gpt.py``: talk to a Megatron checkpoint.

    python generate_gpt.py --load CKPT --tokenizer-type ... --tokenizer-model ... \\
        (--prompt TEXT [--prompt TEXT ...] | --interactive) [--prompt-type NAME] \\
        --max-new-tokens 64 --temperature 0.8 --top-k 0 --top-p 0.9 --seed 1
    torchrun --nproc-per-node TPxPP generate_gpt.py ... (a checkpoint's own TP/PP by default)

Sampling flags are Megatron-LM's (``tools/run_text_generation_server.py``): ``--top-k 1`` (the
default) is greedy; ``--top-k 0`` / ``--top-p 0`` switch a filter off; ``--top_k``, ``--top_p``
and ``--num-tokens-to-generate`` are accepted as Megatron-LM spells them. Answers go to stdout
(rank 0), one block per prompt; logs go to stderr. ``--interactive`` reads one message per line
(an empty line or end of input quits); with ``--prompt-type`` it is a multi-turn chat.
``--port N`` serves Megatron-LM's HTTP API instead (``server.py``; with ``--prompt-type``, also
OpenAI's chat completions, rendered by ``Session.chat_prompt`` as the interactive chat).
"""

import logging
import os
import sys

import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.config import build_parser
from megatron_ext.generation.generator import Generator
from megatron_ext.generation.loading import generation_config, load_weights
from megatron_ext.generation.sampling import SamplingParams
from megatron_ext.generation.server import bind, serve

logger = logging.getLogger("megatron_ext")


def add_generation_args(parser):
    group = parser.add_argument_group("text generation")
    group.add_argument("--prompt", action="append", default=[],
                       help="text to continue (repeatable); or --interactive")
    group.add_argument("--interactive", action="store_true",
                       help="read prompts (or chat messages, with --prompt-type) from stdin")
    group.add_argument("--prompt-type", default=None,
                       help="chat template (megatron_ext/data/instruct/templates.json, or hf) "
                            "of --interactive and of --port's POST /chat/completions")
    group.add_argument("--system", default=None,
                       help="system message for --prompt-type (a chat without one of its own)")
    group.add_argument("--max-new-tokens", "--num-tokens-to-generate", dest="max_new_tokens",
                       type=int, default=64)
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=1)
    group.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.0)
    group.add_argument("--port", type=int, default=None,
                       help="serve Megatron-LM's HTTP API on this port (PUT /api, POST "
                            "/completions, POST /chat/completions with --prompt-type; 0: any "
                            "free port) instead of --prompt/--interactive; requests carry their "
                            "own sampling fields")
    group.add_argument("--host", default="0.0.0.0",
                       help="address --port listens on (Megatron-LM's: every interface)")


class Session:
    """One model and tokenizer on every rank; prompts come from rank 0."""

    def __init__(self, args, world_size: int):
        from megatron_ext.model.gpt import build_model
        from megatron_ext.parallel import ParallelTopology
        from megatron_ext.tokenizer import build_tokenizer

        self.args = args
        self.params = SamplingParams(args.temperature, args.top_k, args.top_p)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
        config, iteration, found, saved = generation_config(args, world_size)
        d = config.data
        self.tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_size,
                                         d.tokenizer_options())
        self.encoder = None
        if args.prompt_type:
            from megatron_ext.data.instruct.pipeline import ConversationEncoder

            self.encoder = ConversationEncoder(self.tokenizer, args.prompt_type)
        self.topology = ParallelTopology.from_config(config.parallel, world_size)
        self.topology.initialize(config.parallel.distributed_backend)
        platform.manual_seed(config.training.seed)  # megatron-core's RNG tracker needs seeds
        model = build_model(config, self.tokenizer.vocab_size).to(platform.device())
        load_weights(model, config, self.tokenizer.vocab_size, iteration, found, saved,
                     self.topology)
        model.eval()
        self.max_length = config.model.max_position_embeddings  # positions a request may fill
        self.generator = Generator(model, self.tokenizer.vocab_size,
                                   [self.tokenizer.eod, self.tokenizer.eos])
        self.rng = torch.Generator().manual_seed(config.training.seed)
        self.history = []

    def shared(self, value):
        """``value`` of rank 0, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def chat_prompt(self, turns):
        """(turns, prompt ids) of a conversation ending with a user turn, rendered with
        --prompt-type; --system opens it unless it has a system turn (the CLI's chat and the
        server's /chat/completions)."""
        if self.args.system and (not turns or turns[0][0] != "system"):
            turns = [("system", self.args.system)] + list(turns)
        return list(turns), self.encoder.encode_prompt(turns)

    def answer(self, text: str) -> str:
        """The model's continuation of ``text`` (a chat turn with --prompt-type)."""
        if self.encoder is not None:
            turns, ids = self.chat_prompt(self.history + [("user", text)])
        else:
            ids = self.tokenizer.tokenize(text)
        # A chat answer ends at the template's stop text, as soon as it is generated.
        stop = (lambda new: self.encoder.reply(new)[2]) if self.encoder is not None else None
        result = self.generator.generate(ids, self.args.max_new_tokens, self.params, self.rng,
                                         stop_when=stop)
        if self.encoder is None:
            return self.tokenizer.detokenize(result.tokens)
        reply = self.encoder.reply(result.tokens)[0]
        self.history = turns + [("assistant", reply)]
        return reply

    def run(self) -> None:
        rank0 = dist.get_rank() == 0
        if not self.args.interactive:
            for prompt in self.args.prompt:
                self.history = []  # each --prompt is a conversation of its own
                reply = self.answer(prompt)
                if rank0:
                    print(reply, flush=True)
            return
        while True:
            line = None
            if rank0:
                try:
                    line = input("> " if sys.stdin.isatty() else "")
                except EOFError:
                    line = ""
            line = self.shared(line)
            if not line.strip():
                return
            reply = self.answer(line)
            if rank0:
                print(reply, flush=True)


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    # Progress from rank 0, problems from every rank; stdout holds the answers alone.
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
                        format="%(message)s")
    parser = build_parser(add_generation_args)
    parser.description = "Generate text with a Megatron checkpoint (megatron-core, KV cache)"
    args = parser.parse_args(argv)
    if (bool(args.prompt) + args.interactive + (args.port is not None)) != 1:
        parser.error("give --prompt TEXT (repeatable), --interactive or --port N")
    if args.port is not None and not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be in [0, 65535] (0: any free port)")
    if args.system is not None and not args.prompt_type:
        parser.error("--system needs --prompt-type (a chat template)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    server = None
    try:
        if args.port is not None and rank == 0:  # a taken port fails before loading anything
            server = bind(args.host, args.port)
        session = Session(args, world_size)
    except (ValueError, OSError) as error:  # ConfigError, CheckpointError, tokenizer, template
        if server is not None:
            server.server_close()
        sys.exit(f"[rank {rank}] generate_gpt.py: {error}")
    try:
        if args.port is not None:
            serve(session, server)
        else:
            session.run()
    finally:
        session.topology.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
