"""The global batch size over training: constant, Megatron-LM's ramp-up (``--rampup-batch-size``,
megatron-core <= 0.16) or step schedule (``--step-batch-size-schedule``, 0.19).

Written here rather than taken from megatron-core's num-microbatches calculator: 0.16 has only
the ramp-up, 0.19 only the step schedule (its ramp-up argument is ignored), and both keep the
calculator in a process-wide global. The rules are the calculators', so either flag means here
what it means in Megatron-LM.
"""

from typing import List, Optional, Tuple

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _number(text: str) -> int:
    text = text.strip().upper()
    scale = _SUFFIXES.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def parse_step_schedule(entries: List[str], seq_length: int) -> List[Tuple[int, int]]:
    """``THRESHOLD:SIZE`` entries (thresholds in tokens, as Megatron-LM passes its
    --seq-length) -> sorted ``(threshold in samples, global batch size)``; ValueError names the
    entry."""
    schedule = []
    for entry in " ".join(entries).replace(",", " ").split():
        threshold, sep, size = entry.partition(":")
        try:
            if not sep:
                raise ValueError
            schedule.append((_number(threshold) // seq_length, _number(size)))
        except ValueError:
            raise ValueError(f"entry {entry!r}: expected THRESHOLD:SIZE such as 2.4B:320") from None
    schedule.sort()
    if not schedule or schedule[0][0] != 0:
        raise ValueError("the first threshold must be 0")
    if any(a[0] == b[0] for a, b in zip(schedule, schedule[1:])):
        raise ValueError("thresholds must be distinct")
    if any(size <= 0 for _, size in schedule):
        raise ValueError("batch sizes must be > 0")
    return schedule


class BatchSizeSchedule:
    """``at(consumed_samples)``: the global batch size of the next step."""

    def __init__(self, global_batch_size: int, rampup: Optional[List[int]] = None,
                 steps: Optional[List[Tuple[int, int]]] = None):
        self.global_batch_size = global_batch_size
        self.rampup = rampup
        self.steps = steps
        if rampup is not None:
            start, increment, samples = rampup
            self.samples_per_increment = samples / ((global_batch_size - start) // increment)

    def at(self, consumed_samples: int) -> int:
        if self.rampup is not None:
            start, increment, samples = self.rampup
            if consumed_samples > samples:
                return self.global_batch_size
            return start + int(consumed_samples / self.samples_per_increment) * increment
        if self.steps is not None:
            return [size for threshold, size in self.steps if consumed_samples >= threshold][-1]
        return self.global_batch_size

    def sizes(self) -> List[int]:
        """Every batch size the schedule can take."""
        if self.rampup is not None:
            start, increment, _ = self.rampup
            return list(range(start, self.global_batch_size + 1, increment))
        if self.steps is not None:
            return [size for _, size in self.steps]
        return [self.global_batch_size]

    def iterations(self, train_samples: int) -> int:
        """Steps that --train-samples makes, counted as Megatron-LM's update_train_iters."""
        if self.rampup is not None:
            iterations = consumed = 0
            while consumed <= self.rampup[2] and consumed <= train_samples:
                consumed += self.at(consumed)
                iterations += 1
            return iterations + (train_samples - consumed) // self.global_batch_size
        if self.steps is not None:
            iterations = consumed = 0
            last_threshold = self.steps[-1][0]
            while consumed < train_samples and consumed < last_threshold:
                consumed += self.at(consumed)
                iterations += 1
            remaining = max(train_samples - consumed, 0)
            return iterations + -(-remaining // self.steps[-1][1])
        return train_samples // self.global_batch_size
