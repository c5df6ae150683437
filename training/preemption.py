"""Stop cleanly on SIGTERM / SIGUSR1: finish the current step, checkpoint it, exit with ``EXIT_REQUEUE``.

The handler only records the signal. Once per step every rank calls :meth:`Preemption.requested`,
a max all-reduce of the flag, so all ranks stop after the same step even when the signal reached only
some of them (a scheduler signalling one node, a user signalling one process). ``train.py`` then
writes a checkpoint, prints how to resume and exits with ``EXIT_REQUEUE`` (75, ``EX_TEMPFAIL``: "try
again later"). Re-running the same command (same ``run_dir``) resumes exactly.

SLURM (``slurm/``): ``#SBATCH --signal=B:USR1@300`` signals the batch script 5 minutes before the
time limit; it forwards USR1 to the ranks, waits, and requeues the job when they exit with 75.
A preemption by the scheduler sends SIGTERM to every process, then SIGKILL after ``KillWait``: a
run that cannot finish its step and checkpoint in time resumes from its previous checkpoint.
"""
import signal
import sys

import torch

EXIT_REQUEUE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self, signals=SIGNALS):
        self.received = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            print(f"received {signal.Signals(signum).name}: stopping after this step's checkpoint",
                  file=sys.stderr, flush=True)
        self.received = signum

    def requested(self, device) -> bool:
        """Whether any rank received a signal. Collective under torch.distributed: all ranks call it."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
