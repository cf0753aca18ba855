"""The training loop: megatron-core model, DDP, optimizer, schedules and logging (evaluation:
``evaluation.py``).

``Trainer.__init__`` is the recipe, in order; ``train`` runs it. The entry script supplies the
forward step (batch -> model -> loss function), as in Megatron-LM's ``pretrain_gpt.py``.
"""

import functools
import gc
import logging
import math
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import platform
from megatron_ext.checkpoint.args import padded_vocab_size
from megatron_ext.checkpoint.sharding import merge_state_dicts, shard_state_dict
from megatron_ext.config import Config, ConfigError
from megatron_ext.config.schedule import BatchSizeSchedule, parse_step_schedule
from megatron_ext.config.validate_compat import check_padded_vocab_size
from megatron_ext.model import lora
from megatron_ext.model.gpt import build_model_chunks
from megatron_ext.parallel import ParallelTopology
from megatron_ext.tokenizer import build_tokenizer, vocab_size_note
from megatron_ext.training import (checkpoint_checks, checkpointing, data, data_resume,
                                   evaluation, hf2mg, multitask, shard_checks, summary)
from megatron_ext.training.early_exit import EarlyExit
from megatron_ext.training.logs import log_once
from megatron_ext.training.metrics import MetricsLogger
from megatron_ext.training.optimizer import build_optimizer, build_scheduler, wrap_ddp
from megatron_ext.training.profiling import StepProfiler

logger = logging.getLogger("megatron_ext")

ForwardStep = Callable  # (config, eod, data_iterator, model) -> (output_tensor, loss_func)


class Trainer:
    def __init__(
        self,
        config: Config,
        forward_step: ForwardStep,
        world_size: Optional[int] = None,
        init_state_dict: Optional[Dict[str, torch.Tensor]] = None,
    ):
        self.config = config
        self.exits = EarlyExit(config.training)
        world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        # 1. Tokenizer: its EOD delimits documents, its size fixes the embedding. Loaded before
        #    any process group exists, so a bad tokenizer file fails every rank alike.
        d = config.data
        try:
            self.tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, d.vocab_size,
                                             d.tokenizer_options())
        except ValueError as error:  # its message names the flag and the file
            raise ConfigError(str(error)) from None
        note = vocab_size_note(d.tokenizer_type, d.vocab_size)
        if note:
            log_once(logger, logging.WARNING, note)
        self.vocab_size = self.tokenizer.vocab_size
        check_padded_vocab_size(config, self.vocab_size)
        #    The shards against it and --split, while a bad one still fails every rank alike.
        split_matrix = shard_checks.check_data(config, self.tokenizer)
        self.shard_sizes = data_resume.shard_sizes(config)  # as trained on: saved, compared
        #    The checkpoint to load and the directory to save to, while they too fail alike;
        #    the vocabulary padded as the checkpoint is.
        checkpoint_checks.check_checkpoints(config)
        checkpointing.adopt_saved_vocab_padding(config, self.vocab_size)
        self.eval_prompts = evaluation.eval_prompts(config, self.tokenizer)
        # 2. Topology and process groups (flags were validated before this point). The runtime
        #    RNG (dropout) is seeded per pipeline stage as in Megatron-LM, so that stages do not
        #    repeat each other's masks; the initial weights do not depend on it (model/init.py).
        self.topology = ParallelTopology.from_config(config.parallel, world_size)
        self.topology.initialize(config.parallel.distributed_backend,
                                 timeout_minutes=config.parallel.distributed_timeout_minutes)
        platform.manual_seed(config.training.seed + 100 * self.topology.pp_rank)
        # 3. Model chunks of this stage (one per virtual stage of the interleaved schedule), on
        #    the device, each wrapped in megatron-core DDP.
        modules = [chunk.to(platform.device())
                   for chunk in build_model_chunks(config, self.vocab_size)]
        for stage, module in enumerate(modules):
            if init_state_dict is not None:
                self._load_full_state_dict(module, init_state_dict, stage)
            if config.lora.enabled:
                lora.freeze_base(module)  # before DDP: no gradient buffers, no optimizer state
        self.model_config = modules[0].config
        self.model = [wrap_ddp(config, module, stage) for stage, module in enumerate(modules)]
        # 4. Optimizer and learning-rate schedule (megatron-core's, counted in samples), over
        #    all chunks.
        self.optimizer = build_optimizer(config, self.model)
        self.scheduler = build_scheduler(config, self.optimizer)
        # 5. megatron-core's hooks: grad sync at the end of the step (each chunk's), loss
        #    scaling. With --overlap-grad-reduce the pipeline schedules start a chunk's reduce
        #    once its last backward is done, and with --overlap-param-gather the interleaved
        #    one starts a chunk's all-gather just before its first forward (Megatron-LM's
        #    align_grad_reduce and align_param_gather, its defaults).
        def per_chunk(hook):
            hooks = [getattr(chunk, hook) for chunk in self.model]
            return hooks if len(hooks) > 1 else hooks[0]

        p = config.parallel
        self.model_config.no_sync_func = per_chunk("no_sync")
        if p.overlap_grad_reduce:
            self.model_config.grad_sync_func = per_chunk("start_grad_sync")
        if p.overlap_param_gather and len(self.model) > 1:
            self.model_config.param_sync_func = per_chunk("start_param_sync")
        self.model_config.finalize_model_grads_func = finalize_model_grads
        self.model_config.grad_scale_func = self.optimizer.scale_loss
        # 6. Resume (model, optimizer, scheduler, RNG, position in the data) from --load (with
        #    LoRA: the base from --load, the adapters and the rest from --lora-load).
        self.iteration = 0
        self.consumed_samples = 0
        self.consumed_valid_samples = 0  # Megatron-LM's: where the next evaluation starts
        self.exited = False  # stopped early (early_exit.py), to be resumed
        self.coba = None
        self.coba_checkpoint = None  # (source, its CoBa state or None) once resumed: coba.py
        if config.mindspeed.enable_hf2mg_convert:
            hf2mg.convert_hf_load(config)  # --load: the HF model -> its Megatron conversion
        if config.checkpoint.load or config.lora.lora_load:
            checkpointing.load_checkpoint(self)
        # 7. Data, sharded over data-parallel ranks, from where the checkpoint left off; the
        #    global batch size may ramp up (in consumed samples, as Megatron-LM's).
        t, m = config.training, config.model
        self.batch_schedule = BatchSizeSchedule(
            t.global_batch_size, t.rampup_batch_size,
            parse_step_schedule(t.step_batch_size_schedule, m.seq_length)
            if t.step_batch_size_schedule else None)
        self.train_ds, self.valid_ds, self.test_ds = data.build_datasets(
            config, self.tokenizer.eod, self.vocab_size,
            [t.train_samples, *evaluation.eval_samples(config)], split_matrix,
        )
        self.forward_step = functools.partial(forward_step, config, self.tokenizer.eod)
        self.valid_iterators = None  # one per validation dataset, from the first evaluation
        self.metrics = MetricsLogger(
            config, padded_vocab_size(self.vocab_size, config.model.make_vocab_size_divisible_by,
                                      config.parallel.tensor_model_parallel_size),
            world_size, enabled=dist.get_rank() == world_size - 1)
        self.history: List[Dict[str, float]] = []
        # Instruction data: per-task losses and --weighted-loss-mode (multitask.py, coba.py).
        self.multitask = self.task_totals = self.coba = None
        if config.data.is_instruction_dataset:
            from megatron_ext.training.sft_dataset import task_names

            self.multitask = multitask.MultiTask(task_names(config), t.weighted_loss_mode,
                                                 t.task_weights)
            self.metrics.task_names = self.multitask.names
            if len(self.multitask.names) > 1:
                names = self.multitask.names
                if t.task_weights is not None:
                    names = [f"{n} (weight {w:g})" for n, w in zip(names, self.multitask.weights)]
                # The last rank's log shows INFO (logs.setup); rank 0's did not, with 2 ranks+.
                log_once(logger, logging.INFO, f"tasks (data_name): {', '.join(names)}; "
                         f"--weighted-loss-mode {t.weighted_loss_mode}")
            if t.weighted_loss_mode == "coba":
                from megatron_ext.training.coba import CoBaSchedule

                self.coba = CoBaSchedule(self)
        # 8. What is trained, where, on what data, at what memory (printed by rank 0).
        self.parameter_counts, self.summary_lines = summary.log_summary(self)

    # -- weights -----------------------------------------------------------------------------
    def _shard_args(self) -> dict:
        m, p = self.config.model, self.config.parallel
        return dict(num_layers=m.num_layers, swiglu=m.swiglu,
                    tied_embeddings=not m.untie_embeddings_and_output_weights,
                    first_stage_layers=p.decoder_first_pipeline_num_layers,
                    last_stage_layers=p.decoder_last_pipeline_num_layers)

    def _load_full_state_dict(self, module, full: Dict[str, torch.Tensor], vp_stage: int) -> None:
        topo = self.topology
        shard = shard_state_dict(
            full, **self._shard_args(), tp_rank=topo.tp_rank, tp_size=topo.tensor_parallel,
            pp_rank=topo.pp_rank, pp_size=topo.pipeline_parallel, vp_stage=vp_stage,
            vp_size=topo.virtual_pipeline,
            vocab_rows=padded_vocab_size(self.vocab_size, self.config.model.make_vocab_size_divisible_by,
                                         topo.tensor_parallel),
        )
        missing, unexpected = module.load_state_dict(shard, strict=False)
        # A base model's state dict has no LoRA adapters: they keep their initial values.
        missing = [k for k in missing if not k.endswith("_extra_state")
                   and not (self.config.lora.enabled and lora.is_adapter(k))]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit the model: missing {missing}, "
                             f"unexpected {unexpected}")

    def full_state_dict(self) -> Optional[Dict[str, torch.Tensor]]:
        """All TP/PP shards (each chunk's) gathered and merged (TP1/PP1 names) on global rank 0,
        else None."""
        topo = self.topology
        local = []
        if topo.dp_rank == 0:
            local = [((topo.tp_rank, topo.pp_rank, stage),
                      {k: v.detach().cpu() for k, v in chunk.module.state_dict().items()
                       if isinstance(v, torch.Tensor)})
                     for stage, chunk in enumerate(self.model)]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, local)
        if dist.get_rank() != 0:
            return None
        return merge_state_dicts(dict(entry for g in gathered for entry in g),
                                 **self._shard_args())

    # -- steps -------------------------------------------------------------------------------
    def num_microbatches(self, global_batch_size: Optional[int] = None) -> int:
        """Gradient accumulation steps of a global batch (by default of --global-batch-size,
        where a ramp-up ends)."""
        t = self.config.training
        return (global_batch_size or t.global_batch_size) // (
            t.micro_batch_size * self.topology.data_parallel)

    def _forward_backward(self, iterator, forward_only: bool,
                          global_batch_size: Optional[int] = None) -> Tuple[float, int]:
        """Runs the schedule over one global batch (by default of --global-batch-size): (mean
        per-token loss, trained tokens), the same on every rank."""
        t, m = self.config.training, self.config.model
        num_microbatches = self.num_microbatches(global_batch_size)
        # Stages exchange [s, b, h] activations; packed (THD) micro-batches are one row of b*s,
        # except under context parallelism, whose rows stay rows (megatron-core divides s by
        # CP).
        packed = self.config.varlen and self.topology.context_parallel == 1
        rows, seq = ((1, t.micro_batch_size * m.seq_length) if packed
                     else (t.micro_batch_size, m.seq_length))
        if self.multitask is not None:  # per-task token counts of the global batch first
            iterator = self.multitask.prepare(iterator, num_microbatches)
        losses = get_forward_backward_func()(
            forward_step_func=self.forward_step, data_iterator=iterator, model=self.model,
            num_microbatches=num_microbatches, seq_length=seq, micro_batch_size=rows,
            decoder_seq_length=seq, forward_only=forward_only,
        )
        # [loss sum, token count] summed over micro-batches on the last stage, then over DP and
        # CP (each CP rank holds its own tokens of the sequences: every token counts once);
        # shared with the whole pipeline so that every rank can report it.
        total = torch.zeros(2, dtype=torch.float64, device=platform.device())
        for entry in losses:
            total += entry["lm loss"].to(total)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group(
            with_context_parallel=True))
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        if self.multitask is not None:
            self.task_totals = self.multitask.reduce(losses)  # [2, tasks]: loss sums, tokens
        return (total[0] / total[1].clamp(min=1)).item(), int(total[1].item())

    def train_step(self, iterator) -> Dict[str, float]:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        global_batch_size = self.batch_schedule.at(self.consumed_samples)
        loss, tokens = self._forward_backward(iterator, False, global_batch_size)
        self._empty_cache(level=1)
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=global_batch_size)
        self._empty_cache(level=2)
        self.iteration += 1
        self.consumed_samples += global_batch_size
        return {
            "iteration": self.iteration, "consumed_samples": self.consumed_samples,
            "global_batch_size": global_batch_size,
            "lm loss": loss, "trained_tokens": tokens, "grad_norm": float(grad_norm or 0.0),
            # The schedule's lr, not the decoupled one (group order changes across a resume).
            "lr": get_canonical_lr_for_logging(self.optimizer.param_groups),
            "loss_scale": float(self.optimizer.get_loss_scale()), "skipped": not update_ok,
            "nan": not math.isfinite(loss),
            **({"task_totals": self.task_totals} if self.multitask is not None else {}),
        }

    def _empty_cache(self, level: int) -> None:
        # --empty-unused-memory-level (Megatron-LM): 1 after forward-backward, 2 after the step.
        if self.config.training.empty_unused_memory_level >= level and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sync_params(self) -> None:
        """With --overlap-param-gather the updated parameters arrive at the next forward's
        pre-hooks; evaluation and saving need them now (Megatron-LM disables the hooks)."""
        if self.config.parallel.overlap_param_gather:
            for chunk in self.model:
                chunk.disable_forward_pre_hook(param_sync=True)

    def resume_param_overlap(self) -> None:
        if self.config.parallel.overlap_param_gather:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def evaluate(self, split: str = "valid", final: bool = False):
        """``evaluation.evaluate``: the loss of the validation (or test) split, logged."""
        return evaluation.evaluate(self, split, final)

    def train(self) -> List[Dict[str, float]]:
        t, l, c = self.config.training, self.config.logging, self.config.checkpoint
        iterator = data.per_chunk(len(self.model), functools.partial(
            data.data_iterator, self.train_ds, self.consumed_samples, t.micro_batch_size,
            self.topology.dp_rank, self.topology.data_parallel, self.config.data.num_workers))
        for chunk in self.model:
            chunk.train()
        profiler = StepProfiler(l.profile_step_start, l.profile_step_end,
                                l.tensorboard_dir or "profile",
                                enabled=l.profile and (not l.profile_ranks
                                                       or dist.get_rank() in l.profile_ranks))
        if t.manual_gc:
            # Megatron-LM's --manual-gc: collections at chosen points, the same on every rank.
            gc.disable()
            gc.collect()
        start_iteration = self.iteration
        window_start, window = time.perf_counter(), []
        while self.iteration < t.train_iters:
            profiler.before_step(self.iteration)
            if self.coba is not None:
                self.coba.before_step(self)
            stats = self.train_step(iterator)
            if self.coba is not None:
                self.coba.after_step(self, stats)
            self.history.append(stats)
            window.append(stats)
            if t.manual_gc and t.manual_gc_interval and self.iteration % t.manual_gc_interval == 0:
                gc.collect()
            if self.iteration % l.log_interval == 0 or self.iteration == t.train_iters:
                elapsed = time.perf_counter() - window_start
                self.metrics.log_train(self.iteration, window, elapsed / len(window))
                window = []
            if l.eval_interval and self.iteration % l.eval_interval == 0:
                self.evaluate()
            exiting = self.exits.reason(self.iteration)
            last = bool(exiting) or self.iteration == t.train_iters
            if c.save and (last or (c.save_interval and self.iteration % c.save_interval == 0)):
                self.sync_params()
                checkpointing.save_checkpoint(self)
                self.resume_param_overlap()
            if c.async_save:
                checkpointing.finalize_saves()
            if exiting:
                logger.info(f"exiting at iteration {self.iteration} ({exiting})")
                self.exited = True
                break
            if not window:
                # The next window times training steps alone, not evaluation or saving.
                window_start = time.perf_counter()
        checkpointing.finalize_saves(blocking=True)
        profiler.stop()
        self.sync_params()  # the model holds the final weights when training returns
        self.resume_param_overlap()
        if t.manual_gc:
            gc.enable()
        if self.iteration == start_iteration:
            logger.info(f"nothing to train: at iteration {self.iteration} of --train-iters "
                        f"{t.train_iters}")
        return self.history

    def close(self) -> None:
        self.exits.close()
        self.metrics.close()
        self.topology.destroy()
