"""The copy of a DiLoCo swarm's outer state an auxiliary peer holds: downloaded, loaded, served and stored.

What a DiLoCo run shares is the outer state (outer weights, outer momentum, the round); each
trainer's inner optimizer is its own. So the auxiliary peer holds an OuterOptimizer over the
model's parameters that never ends a round (`holder=True`): it downloads the outer state from the
trainers, stores it as a checkpoint at the start of its round (inner step 0, the model's weights
being the outer ones), and serves it to joiners half a round below the trainers' priority, so a
joiner takes a trainer's state when one is up and the stored one when none is ("the first peer of
the day"). The same interface as held_state.SwarmState: `epoch` is the round held.
"""

import math
import threading


class DiLoCoHeldState:
    """`outer`: the holder's OuterOptimizer; `epoch`: the round of the state held (None until a real one)."""

    def __init__(self, options, outer):
        self.options, self.outer = options, outer
        self.averager = outer.averager  # stopped with the DHT when the auxiliary peer stops at once
        self.lock = threading.Lock()
        self.epoch: int | None = None

    @classmethod
    def download_only(cls, peer, module):
        """An OuterOptimizer like the trainers' (same prefix and tensors) that only downloads and serves."""
        from convmodel.collaborative.diloco import OuterOptimizer
        from convmodel.collaborative.signals import shielded_children

        options = peer.options
        with shielded_children():  # the averager process ignores terminal signals, dies with us (signals.py)
            outer = OuterOptimizer(
                peer.dht, options.run_id, module.parameters(), outer_lr=options.outer_lr,
                outer_momentum=options.outer_momentum, compression=options.pseudo_gradient_compression,
                averaging_timeout=options.averaging_timeout, matchmaking_time=options.matchmaking_time,
                request_timeout=options.request_timeout, next_chunk_timeout=options.next_chunk_timeout,
                client_mode=options.client_mode, holder=True)
        return cls(options, outer)

    def download(self, max_epoch: float = math.inf) -> bool:
        """Fetch the outer state of the most advanced trainer; True when its round is newer than the one held.

        A trainer serves its step in the round too; the outer weights are those of the round's start, so the
        holder keeps them as round R, step 0 (what a peer resuming from them should do: train the round)."""
        with self.lock:
            outer, held = self.outer, self.epoch
            if held is not None:
                outer.inner_step = 0
            loaded = outer.load_state_from_peers(timeout=self.options.load_state_timeout, only_ahead=held is not None,
                                                 max_round=max_epoch)
            outer.inner_step = 0
            newer = loaded and (held is None or outer.round > held)
            if loaded:
                self.epoch = outer.round
                outer.serve()
            return newer

    def load_checkpoint(self, checkpoint: dict, module) -> int:
        """Take the outer state of a stored checkpoint (to serve it and to store on from it); returns its round."""
        state = checkpoint.get("diloco")
        if not isinstance(state, dict) or "outer" not in state:
            raise KeyError("the checkpoint holds no DiLoCo outer state (diloco.outer): it was written by a "
                           "synchronous run")
        with self.lock:
            module.load_state_dict(checkpoint["state_dict"])
            self.outer.load_state_dict(state, into_params=True)
            self.outer.inner_step = 0
            self.epoch = self.outer.round
            self.outer.serve()
        return self.epoch

    def checkpoint(self, module, datamodule, metrics: dict[str, float]) -> dict:
        """A checkpoint of the held outer state: the model's weights are the outer ones (copied under the lock)."""
        from convmodel.collaborative.checkpoint_store import make_checkpoint

        with self.lock:
            diloco = {**self.outer.state_dict(), "inner_step": 0, "samples_this_round": 0, "weightless_round": False}
            checkpoint = make_checkpoint(module, None, self.epoch, datamodule=datamodule, metrics=metrics,
                                         run_id=self.options.run_id, diloco=diloco)
            checkpoint["state_dict"] = {name: value.clone() for name, value in checkpoint["state_dict"].items()}
        return checkpoint

    def shutdown(self) -> None:
        self.outer.shutdown()
