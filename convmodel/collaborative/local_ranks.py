"""Several devices in one swarm peer: local data parallelism behind one hivemind identity.

`trainer.devices: N` starts N processes on this machine (Lightning's script launcher, as in local
DDP); the swarm sees one peer. Rank 0 alone owns the DHT and the hivemind.Optimizer; every rank
computes gradients on its own shard of the data (JsonlDataModule shards by trainer.global_rank).
Each local step:

1. every rank: the gradients are averaged across the ranks (one all-reduce, as DDP's);
2. one all-reduce of what the ranks must agree on: the samples they added, whether a rank saw a
   non-finite loss, whether one was asked to stop (Ctrl-C reaches every rank, not at the same
   instant: a rank that stopped a step before the others would leave them in a collective);
3. rank 0 steps the swarm with the sum of the samples (counted once per rank);
4. rank 0 says whether its parameters changed (ParameterVersion) and whether to stop; when they
   changed, every parameter and buffer follows from rank 0. The same check runs before every
   forward, so what changed between steps (a checkpoint waits for the delayed step to land) also
   arrives before any rank trains on it.

Why not torch's DistributedDataParallel: it all-reduces inside backward, and hivemind.Optimizer
with reused gradient buffers sums local steps in the same .grad tensors; the explicit all-reduce
keeps the gradient and the parameters under this module's control (RuLeanALBERT's sync.py, the
precedent, runs real DDP and a no-op optimizer on the other ranks).
"""

from datetime import timedelta

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 * 2**20  # one collective moves at most this much (a flat copy of that size is made)


def process_group_timeout(options) -> timedelta:
    """Long enough for the longest wait of the other ranks on rank 0: joining (bootstrap, then a state download),
    an averaging round and the goodbye; never below torch's default of 30 minutes."""
    seconds = (options.bootstrap_timeout + options.load_state_timeout + options.matchmaking_time
               + 2 * options.averaging_timeout + 15.0 + 60.0)
    return timedelta(seconds=max(1800.0, seconds))


class LocalRanks:
    """The collectives of one peer's ranks (the default process group, started by the strategy)."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Each .grad becomes the mean over the ranks (a rank without one contributes zeros)."""
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for bucket in _buckets(grads):
            flat = torch._utils._flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            for grad, averaged in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(averaged)

    def agree(self, samples: int, non_finite_loss: bool, stop: bool) -> tuple[int, bool, bool]:
        """The ranks' samples summed, and whether any saw a non-finite loss or was asked to stop."""
        values = torch.tensor([samples, int(non_finite_loss), int(stop)], dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        total, non_finite, stopping = values.tolist()
        return int(total), non_finite > 0, stopping > 0

    def decide(self, *flags: bool) -> list[bool]:
        """Rank 0's flags, on every rank."""
        values = torch.tensor([int(flag) for flag in flags], dtype=torch.int64, device=self.device)
        dist.broadcast(values, src=0)
        return [bool(value) for value in values.tolist()]

    def broadcast_tensors(self, tensors: list[torch.Tensor]) -> None:
        """Rank 0's values into every rank's tensors, in place."""
        for bucket in _buckets(tensors):
            flat = torch._utils._flatten_dense_tensors([t.detach() for t in bucket])
            dist.broadcast(flat, src=0)
            with torch.no_grad():
                for tensor, value in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket), strict=True):
                    tensor.copy_(value)

    def broadcast_object(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of one dtype and device, each at most BUCKET_BYTES (a larger tensor alone)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        last = buckets[-1][-1] if buckets else None
        if last is None or last.dtype != tensor.dtype or last.device != tensor.device or size + nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += nbytes
    return buckets


class ParameterVersion:
    """Counts the writes to a swarm peer's parameters, so that rank 0 sends them only when they changed.

    The parameters change in hivemind's optimizer step (on the module's parameters, or, offloaded, when
    the offloaded copies are copied back), when an averaging round's result or a delayed update is
    applied, when a state is downloaded, and when the NaN guard restores a backup. Each of those calls is
    counted on this peer's own objects; the collaborative epoch is watched too, as a second sign.
    """

    def __init__(self, peer):
        self.value = 0
        self._seen = (-1, -1)
        opt = peer.optimizer
        averager = opt.state_averager
        if not averager.offload_optimizer:  # the inner optimizer steps the module's parameters themselves
            opt.opt.register_step_post_hook(lambda *_: self._bump())
        for owner, name in ((averager, "_apply_optimizer_parameters_"), (averager, "_apply_averaging_results_"),
                            (opt, "load_state_from_peers"), (peer.guard, "restore")):
            setattr(owner, name, self._counting(getattr(owner, name)))
        self._opt = opt

    def _bump(self) -> None:
        self.value += 1

    def _counting(self, method):
        def counted(*args, **kwargs):
            try:
                return method(*args, **kwargs)
            finally:
                self._bump()

        return counted

    def changed(self) -> bool:
        """Whether the parameters may have changed since the last call that returned True."""
        now = (self.value, self._opt.local_epoch)
        if now == self._seen:
            return False
        self._seen = now
        return True
