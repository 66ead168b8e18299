"""The Lightning side of several devices in one swarm peer (local_ranks.py says how the ranks train).

HivemindStrategy subclasses SingleDeviceStrategy, the smallest base that fits one device; this mixin
gives it what Lightning asks of a multi-process strategy when `trainer.devices > 1`: the script
launcher that starts ranks 1..N-1 (each runs the same command with LOCAL_RANK set), the ranks
Lightning and the data module read (trainer.global_rank, world_size), the process group, and the
collectives callbacks use (barrier, broadcast, reduce). With one device every method here behaves
as SingleDeviceStrategy's.
"""

from typing import Any

import torch
from typing_extensions import override

from convmodel.collaborative.local_ranks import LocalRanks, process_group_timeout
from convmodel.collaborative.swarm_options import OPTION
from convmodel.errors import UserError


class LocalRanksMixin:
    """Ranks, launcher and collectives of a swarm peer with several devices (see the module docstring)."""

    parallel_devices: list[torch.device] | None
    cluster_environment: Any
    ranks: LocalRanks | None
    options: Any  # SwarmOptions

    @property
    def several_devices(self) -> bool:
        return len(self.parallel_devices or []) > 1

    # ---- ranks -------------------------------------------------------------------------------------

    # SingleDeviceStrategy.__init__ assigns 0, 0 and 1; here they follow the devices (the setters ignore it)

    @property
    def local_rank(self) -> int:
        return self.cluster_environment.local_rank() if self.several_devices and self.cluster_environment else 0

    @local_rank.setter
    def local_rank(self, _: int) -> None:
        pass

    @property
    def global_rank(self) -> int:
        return self.local_rank  # one machine: num_nodes > 1 is refused

    @global_rank.setter
    def global_rank(self, _: int) -> None:
        pass

    @property
    def node_rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return len(self.parallel_devices) if self.several_devices else 1

    @world_size.setter
    def world_size(self, _: int) -> None:
        pass

    @property
    def num_processes(self) -> int:
        return self.world_size

    @property
    @override
    def is_global_zero(self) -> bool:
        return self.global_rank == 0

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[self.local_rank] if self.parallel_devices else self._root_device

    def set_world_ranks(self) -> None:
        """Called by Lightning's connector once the devices are known: the ranks rank_zero_only and logs read."""
        if not self.several_devices or self.cluster_environment is None:
            return
        from lightning_fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
        from pytorch_lightning.utilities.rank_zero import rank_zero_only

        self.cluster_environment.set_global_rank(self.local_rank)
        self.cluster_environment.set_world_size(self.world_size)
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    @override
    def _configure_launcher(self) -> None:
        """When the Trainer is built: refuse what several ranks cannot do before any rank is started."""
        if not self.several_devices:
            return
        options, problems = self.options, []
        if options.algorithm == "diloco":
            problems.append("algorithm diloco runs one device per peer")
        if options.reuse_grad_buffers:
            # hivemind sums the local steps in .grad, where the ranks' all-reduce writes each step's mean
            problems.append("reuse_grad_buffers cannot sum local steps in the buffers the ranks average into")
        if problems:
            raise UserError(f"trainer.devices: {len(self.parallel_devices)} devices in one peer: "
                            + "; ".join(problems) + f"; set trainer.devices: 1 or change {OPTION}")
        if not self.cluster_environment.creates_processes_externally:
            from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher

            self._launcher = _SubprocessScriptLauncher(self.cluster_environment, self.world_size, 1)

    def start_ranks(self, options) -> None:
        """In setup_environment: join this peer's process group."""
        from lightning_fabric.utilities.distributed import (
            _get_default_process_group_backend_for_device,
            _init_dist_connection,
        )

        backend = _get_default_process_group_backend_for_device(self.root_device)
        _init_dist_connection(self.cluster_environment, backend, self.global_rank, self.world_size,
                              timeout=process_group_timeout(options))
        self.ranks = LocalRanks(self.global_rank, self.world_size, self.root_device)

    # ---- collectives Lightning and callbacks call ------------------------------------------------------

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self.ranks is not None:
            self.ranks.barrier()

    @override
    def broadcast(self, obj, src: int = 0):
        return self.ranks.broadcast_object(obj, src) if self.ranks is not None else obj

    @override
    def reduce(self, tensor, group: Any | None = None, reduce_op: Any | None = "mean"):
        if self.ranks is None or not isinstance(tensor, torch.Tensor):
            return tensor
        from lightning_fabric.utilities.distributed import _sync_ddp_if_available

        return _sync_ddp_if_available(tensor, group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Any | None = None, sync_grads: bool = False) -> torch.Tensor:
        if self.ranks is None:
            return tensor
        from lightning_fabric.utilities.distributed import _all_gather_ddp_if_available

        return _all_gather_ddp_if_available(tensor, group=group, sync_grads=sync_grads)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        if self.ranks is None:
            return decision
        count = torch.tensor(int(decision), device=self.root_device)
        torch.distributed.all_reduce(count)
        return bool(count == self.world_size) if all else bool(count > 0)
