"""The copy of the swarm's training state an auxiliary peer holds: downloaded, loaded, served and stored.

The auxiliary peer trains nothing, so its state moves only by download (from the swarm or a
stored checkpoint); it serves that state to joining peers only while it is a real one and its
epoch is the one it reports (see SwarmState).
"""

import math
import sys
import threading
import warnings


class SwarmState:
    """The copy of the swarm's training state this peer holds: downloaded, loaded, served and stored.

    `averager` is a TrainingStateAverager under the trainers' prefix: our own (download and serve
    only) or, when assisting, the one inside the auxiliary hivemind.Optimizer `opt`. `lock` serialises
    everything that touches it (downloads, checkpoint copies, the assisting thread's steps).

    `epoch` is the collaborative epoch of the parameters held (None until a real state arrives).
    When assisting, the optimizer's own epoch moves on with the swarm while its parameters stay (an
    auxiliary peer never steps them); the state is served only while both epochs agree, so that a
    joining peer never receives old parameters under a new epoch.
    """

    def __init__(self, options, averager, opt=None):
        self.options, self.averager, self.opt = options, averager, opt
        self.lock = threading.Lock()
        self.epoch: int | None = None
        limit_download_epochs(averager)

    @classmethod
    def download_only(cls, peer, module_optimizer, scheduler, module):
        """A TrainingStateAverager like the trainers' (same prefix, tensors, schedule and schema) and no optimizer."""
        from convmodel.collaborative.optimizer_rebuild import rebuild_optimizer, rebuild_scheduler
        from convmodel.collaborative.signals import shielded_children
        from convmodel.collaborative.state_check import checked_state_averager_class, describe_state

        options = peer.options
        optimizer_factory, param_groups = rebuild_optimizer(module_optimizer, None, "norm")
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        with shielded_children():  # the averager process ignores terminal signals, dies with us (signals.py)
            averager = checked_state_averager_class()(  # a download that does not fit the config is refused
                dht=peer.dht, prefix=f"{options.run_id}_state_averager", optimizer=optimizer_factory,
                params=param_groups, scheduler=rebuild_scheduler(scheduler), offload_optimizer=False,
                client_mode=options.client_mode, allow_state_sharing=False,
                min_matchmaking_time=options.matchmaking_time, next_chunk_timeout=options.next_chunk_timeout,
                request_timeout=options.request_timeout, start=True)
        describe_state(averager, module, module_optimizer)
        return cls(options, averager)

    def load_checkpoint(self, checkpoint: dict, module) -> int:
        """Take the state of a stored checkpoint (to serve it and to store on from it); returns its epoch."""
        import torch

        from convmodel.collaborative.checkpoint_store import checkpoint_epoch

        epoch = checkpoint_epoch(checkpoint)
        optimizer_state = checkpoint["optimizer_states"][0]
        optimizer_state = dict(optimizer_state, state={k: v for k, v in optimizer_state["state"].items()
                                                       if k != "local_epoch"})
        with self.lock, torch.no_grad():
            module.load_state_dict(checkpoint["state_dict"])
            inner = [p for group in self.averager.optimizer.param_groups for p in group["params"]]
            for main, offloaded in zip(self.averager.main_parameters, inner):
                if offloaded is not main:  # offload_optimizer: the optimizer keeps its own copy
                    offloaded.copy_(main)
            self.averager.optimizer.load_state_dict(optimizer_state)
            self._set_local_epoch(max(epoch, self.averager.local_epoch))
            self.epoch = epoch
            self._update_sharing()
        return epoch

    def download(self, max_epoch: float = math.inf) -> bool:
        """Fetch the newest state a peer shares; True when it is newer than the one held.

        TrainingStateAverager refuses a state older than its local epoch and says nothing of what it
        did, so the local epoch is set to the held state's epoch for the call: a higher one after it
        means a newer state arrived. A state whose epoch is above `max_epoch` (what the swarm can
        plausibly be at, plausibility.py) is refused before any of it is applied, and said.
        """
        with self.lock:
            averager, held = self.averager, self.epoch or 0
            own_epoch = averager.local_epoch  # differs from held only while not serving (see _update_sharing)
            averager.local_epoch = held
            averager.epoch_limit, averager.refused_epoch = max_epoch, None
            try:
                averager.load_state_from_peers(timeout=self.options.load_state_timeout)
                mismatch, averager.state_mismatch = getattr(averager, "state_mismatch", None), None
                if mismatch:  # a peer of another config under this run_id: the held state stays
                    print(f"[convmodel] refused the state a peer sent: {mismatch}", file=sys.stderr, flush=True)
            finally:
                averager.epoch_limit = math.inf
                if averager.refused_epoch is not None:
                    print(f"[convmodel] refused the state a peer sent: its collaborative epoch "
                          f"{averager.refused_epoch} is implausible (at most {max_epoch:.0f} now, from the "
                          f"swarm's metrics records); the held state stays", file=sys.stderr, flush=True)
                received = averager.local_epoch
                self._set_local_epoch(max(own_epoch, received))
                if received > held:
                    self.epoch = received
                self._update_sharing()
            return received > held

    def _set_local_epoch(self, epoch: int) -> None:
        """Set the epoch of the state averager (and of the optimizer's progress report) and its schedule."""
        averager = self.averager
        if self.opt is None:
            averager.local_epoch = epoch
        else:
            tracker = self.opt.tracker
            with tracker.pause_updates():
                averager.local_epoch = epoch
                if tracker.local_progress.epoch != epoch:
                    tracker.report_local_progress(local_epoch=epoch, samples_accumulated=0)
        if averager.scheduler is not None:
            while averager.scheduler.last_epoch < epoch:
                averager.scheduler.step()

    def _update_sharing(self) -> None:
        """Serve the state to joining peers when it is real and its epoch is the one we report."""
        averager = self.averager
        if self.options.client_mode:
            return
        share = self.epoch is not None and averager.local_epoch == self.epoch
        if share:
            averager.state_sharing_priority = float(self.epoch)
        if averager.allow_state_sharing != share:
            averager.allow_state_sharing = share

    def checkpoint(self, module, datamodule, metrics: dict[str, float]) -> dict:
        """A checkpoint of the held state (copied under the lock; written to disk by the caller)."""
        import copy

        from convmodel.collaborative.checkpoint_store import make_checkpoint

        with self.lock:
            checkpoint = make_checkpoint(module, self.averager.optimizer.state_dict(), self.epoch,
                                         datamodule=datamodule, metrics=metrics, run_id=self.options.run_id)
            checkpoint["state_dict"] = {name: value.clone() for name, value in checkpoint["state_dict"].items()}
            checkpoint["optimizer_states"] = copy.deepcopy(checkpoint["optimizer_states"])
        return checkpoint

    def assist(self) -> None:
        """One step of hivemind's auxiliary mode: join the averaging round when the swarm ends an epoch."""
        opt = self.opt
        with self.lock:
            if opt.local_epoch < opt.tracker.global_epoch - 1:
                # far behind (a long download held the lock): follow the swarm's epoch rather than step
                # through every missed epoch with an averaging round of its own
                self._set_local_epoch(opt.tracker.global_epoch)
            if opt.tracker.ready_to_update_epoch and self.averager.allow_state_sharing:
                self.averager.allow_state_sharing = False  # the epoch moves on; our parameters stay
            opt.step()
            self._update_sharing()

    def shutdown(self) -> None:
        if self.opt is None:  # the swarm peer shuts its own optimizer down when it leaves
            self.averager.shutdown()


def limit_download_epochs(averager) -> None:
    """Make `averager` (a hivemind TrainingStateAverager) refuse a downloaded state whose epoch is above its
    `epoch_limit`, before TrainingStateAverager applies any of it.

    TrainingStateAverager.load_state_from_peers takes (metadata, tensors) from DecentralizedAverager's,
    copies the tensors into the parameters and optimizer state, then steps the LR scheduler up to the
    received epoch, one step at a time: a state at epoch 10**9 overwrites the held state and hangs the
    peer for hours. The check has to sit between the two, so the averager's class becomes a subclass
    with EpochLimitedDownload under TrainingStateAverager in the method order. The averager is built
    here or by hivemind.Optimizer (assisting), and already runs, so its class is swapped in place; the
    new class keeps the old name (hivemind names the RPC protocols after it) and adds no state.
    """
    from hivemind.averaging import DecentralizedAverager

    class EpochLimitedDownload(DecentralizedAverager):
        """A downloaded state above `epoch_limit` is returned as no state; its epoch goes to `refused_epoch`."""

        epoch_limit: float = math.inf
        refused_epoch: int | None = None

        def load_state_from_peers(self, **kwargs):
            loaded = super().load_state_from_peers(**kwargs)
            epoch = loaded[0].get("epoch") if loaded is not None and isinstance(loaded[0], dict) else None
            if isinstance(epoch, int) and epoch > self.epoch_limit:
                self.refused_epoch = epoch
                return None
            return loaded

    base = type(averager)
    limited = type(base.__name__, (base, EpochLimitedDownload), {"__qualname__": base.__qualname__,
                                                                 "__module__": base.__module__})
    averager.__class__ = limited
