"""One DiLoCo peer without Lightning: the DHT, the outer optimizer, the inner-step count, joining, leaving.

HivemindStrategy holds one instead of a SwarmPeer under `algorithm: diloco`. The module's own
optimizer and schedule are the inner ones, stepped by Lightning every batch as in a local run
(clipping, accumulation and precision included); every `inner_steps` of them the peer ends a round
(diloco.py: the pseudo-gradients are averaged and the outer step lands in the model):

    peer = DiLoCoPeer(options)
    peer.join(module.parameters())      # DHT + OuterOptimizer
    peer.catch_up(scheduler)            # a joiner takes the outer state, the round's step and the schedule's
    for each inner step: peer.add_loss(loss); peer.after_inner_step(samples)  # a RoundResult at a round's end
    peer.leave()

Like a synchronous peer it keeps a signed metrics record in the DHT (the round as its epoch, the
loss summed over the round's steps: the auxiliary peer's monitor reads it) and, with status_file,
the status file of Docker's health check.

A joiner downloads the outer weights of the round under way and the server's step in it, so it
ends that round with the others; it trained fewer steps from them, so it sends weight 0 there.
The inner schedule counts global inner steps (round x inner_steps + step in the round), for a
joiner too.
"""

import sys
import time

import torch

from convmodel.collaborative.diloco import OuterOptimizer, RoundResult
from convmodel.collaborative.exit_noise import ignore_pending_tasks_destroyed_after_leaving
from convmodel.collaborative.signals import shielded_children
from convmodel.collaborative.swarm_options import SwarmOptions
from convmodel.collaborative.swarm_peer import SwarmPeer
from convmodel.health import StatusFile, status_path


class DiLoCoPeer:
    """The DiLoCo session of one process: `dht` and `optimizer` (the OuterOptimizer) once joined."""

    def __init__(self, options: SwarmOptions):
        self.options = options
        self._network = SwarmPeer(options)  # its DHT start: addresses, access policy, join address, peers_file
        self.optimizer: OuterOptimizer | None = None
        self.samples_this_round = 0
        self.weightless_round = False  # joined mid-round: this round's pseudo-gradient counts 0
        self.resumed = False
        self.last: RoundResult | None = None
        self.bytes_sent = 0  # the all-reduce's share, estimated from the compression (received: the same)
        self._round_started = time.monotonic()
        self.samples_contributed = 0
        self._samples_per_second = 0.0  # this peer's, over its last round
        self._loss_sum: torch.Tensor | None = None  # this round's losses (a tensor: no device sync per step)
        self._mini_steps = 0
        self._publisher = None  # MetricsPublisher, once caught up
        self.status: StatusFile | None = None

    @property
    def dht(self):
        return self._network.dht

    def join(self, params) -> OuterOptimizer:
        """Check the options, start the DHT and the outer optimizer over the model's parameters."""
        options = self.options
        with shielded_children():  # hivemind's processes ignore Ctrl-C and die with this one
            self._network.start_dht()
            self.optimizer = OuterOptimizer(
                self.dht, options.run_id, params, outer_lr=options.outer_lr, outer_momentum=options.outer_momentum,
                compression=options.pseudo_gradient_compression, averaging_timeout=options.averaging_timeout,
                matchmaking_time=options.matchmaking_time, request_timeout=options.request_timeout,
                next_chunk_timeout=options.next_chunk_timeout, target_group_size=options.target_group_size,
                client_mode=options.client_mode, declaration_expiration=options.metadata_expiration)
        return self.optimizer

    # ---- joining and checkpoints ------------------------------------------------------------

    def catch_up(self, scheduler=None) -> None:
        """Before the first inner step: take the swarm's outer state if a peer serves one (a resumed peer only
        if it is further along), then step the inner schedule to the global inner step."""
        outer = self.optimizer
        if outer.load_state_from_peers(timeout=self.options.load_state_timeout, only_ahead=self.resumed):
            self.weightless_round = outer.inner_step > 0
            self.samples_this_round = 0
            print(f"[convmodel] DiLoCo: joined at round {outer.round}, inner step {outer.inner_step} of "
                  f"{self.options.inner_steps}", file=sys.stderr, flush=True)
            if outer.inner_step >= self.options.inner_steps:  # the server is in the round's all-reduce: join it
                self._end_round(0, None)
        if scheduler is not None:
            target = outer.round * self.options.inner_steps + outer.inner_step
            while scheduler.last_epoch < target:
                scheduler.step()
        self._round_started = time.monotonic()
        self._start_reporting()

    def _start_reporting(self) -> None:
        from convmodel.collaborative.publisher import MetricsPublisher

        options = self.options
        self._publisher = MetricsPublisher(self.dht, options.run_id, self._network.signer,
                                           options.metadata_expiration)
        self._publish()  # counted by the monitor from the start, not only after a round
        self.status = StatusFile(status_path(options.status_file), "trainer", options.run_id)
        self._write_status(joined=True)

    def _publish(self) -> None:
        """The record the monitor reads: the round this peer is in, its loss summed over the round that ended."""
        if self._publisher is None:
            return
        self._publisher.publish(epoch=self.optimizer.round, samples_per_second=self._samples_per_second,
                                samples_accumulated=self.samples_contributed,
                                loss=float(self._loss_sum) if self._loss_sum is not None else None,
                                mini_steps=self._mini_steps)
        self._loss_sum, self._mini_steps = None, 0

    def _write_status(self, joined: bool) -> None:
        if self.status is None or self.status.path is None:
            return
        self.status.write(joined=joined, epoch=self.optimizer.round if self.optimizer is not None else None,
                          peers=self.last.peers if self.last is not None else 1,
                          peer_id=str(self.dht.peer_id) if self.dht is not None else None)

    def state_dict(self) -> dict:
        return {**self.optimizer.state_dict(), "samples_this_round": self.samples_this_round,
                "weightless_round": self.weightless_round}

    def load_state_dict(self, state: dict | None) -> None:
        """From a checkpoint, after Lightning loaded the model's (mid-round) weights; none: a synchronous run's
        checkpoint, whose weights become the outer weights."""
        self.resumed = True
        if state is None:
            self.optimizer.reset_outer_to_params()
            return
        self.optimizer.load_state_dict(state, into_params=False)
        self.samples_this_round = int(state.get("samples_this_round", 0))
        self.weightless_round = bool(state.get("weightless_round", False))

    # ---- stepping ---------------------------------------------------------------------------

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().sum()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._mini_steps += 1

    def after_inner_step(self, samples: int, lr: float | None = None) -> RoundResult | None:
        """Count one inner step of `samples`; at the round's last one, end the round (returns what it did)."""
        outer = self.optimizer
        self.samples_this_round += samples
        self.samples_contributed += samples
        outer.inner_step += 1
        outer.partners.declare(outer.round)  # a client-mode peer's "I train here", renewed when due
        if outer.inner_step < self.options.inner_steps:
            return None
        return self._end_round(0 if self.weightless_round else self.samples_this_round, lr)

    def _end_round(self, weight: float, lr: float | None) -> RoundResult:
        """The round's all-reduce and outer step; a peer that sees no other peer of the run steps alone at once
        (a round with no one to average with would wait averaging_timeout for nothing)."""
        outer = self.optimizer
        alone = not outer.averager.client_mode and not outer.partners.any()
        result = outer.end_round(weight, average=not alone)
        samples, self.last, self.samples_this_round, self.weightless_round = self.samples_this_round, result, 0, False
        self.bytes_sent += result.approx_bytes_sent
        seconds, self._round_started = time.monotonic() - self._round_started, time.monotonic()
        self._samples_per_second = samples / max(seconds, 1e-9)
        self._publish()
        self._write_status(joined=True)
        notes = [f"{result.peers} peer{'s' if result.peers != 1 else ''}", f"{result.samples:g} samples",
                 f"{seconds:.2f} s", f"outer {outer.fingerprint()[:12]}"]
        if lr is not None:
            notes.append(f"lr {lr:.3g}")
        if alone:
            notes.append("alone")
        elif result.fell_back:
            notes.append("no all-reduce: local pseudo-gradient")
        if result.repaired:
            notes.append("the group's outer weights differed: averaged back together")
        elif not result.agreed:
            notes.append("the group's outer weights differed")
        print(f"[convmodel] DiLoCo round {result.round} ({', '.join(notes)})", file=sys.stderr, flush=True)
        return result

    @property
    def finished(self) -> bool:
        last = self.options.max_collaborative_epochs
        return last is not None and self.optimizer is not None and self.optimizer.round >= last

    def metrics(self) -> dict[str, float]:
        """The collab/* scalars of this inner step (the same tags as in synchronous mode, plus DiLoCo's own)."""
        outer = self.optimizer
        values = {"collab/epoch": float(outer.round), "collab/inner_step": float(outer.inner_step),
                  "collab/fallback_rounds": float(outer.fallbacks), "collab/skipped_steps": float(outer.skipped),
                  "collab/bytes_sent": float(self.bytes_sent), "collab/bytes_received": float(self.bytes_sent)}
        if self.last is not None:
            values["collab/peers"] = float(self.last.peers)
        return values

    # ---- leaving ----------------------------------------------------------------------------

    def leave(self) -> bool:
        """Stop the outer averager and the DHT (safe to call twice). Nothing to wait for: no round is under way
        between inner steps. Returns False (a Ctrl-C here is not caught: it ends the run at once)."""
        self._write_status(joined=False)  # unhealthy from here: it is leaving
        self.status = None
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()  # the record then expires on its own
        outer, self.optimizer = self.optimizer, None
        if outer is not None:
            outer.shutdown()
        dht, self._network.dht = self.dht, None
        if dht is not None:
            dht.shutdown()
        ignore_pending_tasks_destroyed_after_leaving()
        return False

    def stop_at_once(self) -> None:
        self.leave()  # nothing in it waits for a round; the metrics record's last stores are bounded (5 s)
