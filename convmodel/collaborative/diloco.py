"""DiLoCo's outer loop without Lightning: shared fp32 outer weights, a pseudo-gradient all-reduce, a Nesterov step.

DiLoCo (Douillard et al. 2023, arXiv:2311.08105): each peer takes H steps of its own (inner)
optimizer, then the peers average their pseudo-gradients (outer weights minus local weights) and
apply one outer Nesterov SGD step to the outer weights, which every peer then continues from:

    outer = OuterOptimizer(dht, run_id, model.parameters())
    for each round: H inner steps on the model, then outer.end_round(samples_this_round)

What this does that OpenDiLoCo (open_diloco/hivemind_diloco.py) does not:
- pseudo-gradients count by the samples behind them (the averager's weight);
- a failed or partial all-reduce falls back to the local pseudo-gradient and is counted, never raised;
- a non-finite pseudo-gradient never leaves the peer: it joins the round with zeros and weight 0,
  so its groupmates do not wait for it and it still receives their average;
- rounds are matched by their number (the group key), so peers one round apart never pair;
- the outer weights are not re-averaged: every groupmate receives the same bytes of the average
  (exact_allreduce.py; hivemind's delta all-reduce leaves each peer its own rounding), so they stay
  identical; each round's gather carries their fingerprint and a round says whether the group agreed.
"""

import copy
import hashlib
import math
import sys
import threading
from dataclasses import dataclass
from typing import Any

import torch

from convmodel.collaborative.diloco_partners import HOLDER_PRIORITY_OFFSET, RoundPartners
from convmodel.collaborative.nan_guard import all_finite

#: bytes per element the all-reduce sends, by compression name (uint8 adds a 256-entry codebook per part)
_BYTES_PER_ELEMENT = {"none": 4, "fp16": 2, "uint8": 1, "size-adaptive": 1}


@dataclass
class RoundResult:
    """What one outer round did."""

    round: int  # the outer epoch this round ended (the counter before it was incremented)
    peers: int  # peers in the all-reduce group, this one included (1 when it fell back)
    samples: float  # samples behind the applied pseudo-gradient (the group's sum, or this peer's own)
    fell_back: bool  # the all-reduce failed or was partial: the local pseudo-gradient was applied
    sent: bool  # this peer's pseudo-gradient was finite and took part (weight = its samples)
    stepped: bool  # the outer optimizer stepped (False only when no finite pseudo-gradient was at hand)
    agreed: bool  # every groupmate held the same outer weights before the round (True when alone)
    repaired: bool  # they did not, and the group averaged its outer weights and momentum after the step
    approx_bytes_sent: int  # this peer's share of the all-reduce, estimated from the compression (received: the same)


class OuterOptimizer:
    """DiLoCo's outer optimizer over a model's parameters: fp32 CPU outer weights, SGD(nesterov), an averager.

    `params`: the model's parameters (any device or dtype); they are overwritten with the outer weights
    at the end of every round. The outer weights start as a copy of them: every peer must start from the
    same weights (or load another peer's state: `load_state_from_peers`, `load_state_dict`).
    `target_group_size`: a group assembles as soon as it has this many peers (None: everyone who comes
    within `matchmaking_time`). A follower gives up on a leader `request_timeout` after the group's
    expiration: keep it well above the machines' scheduling delays, or a leader may count a follower
    that has left (both then fall back for that round, and the leader waits up to `averaging_timeout`).
    """

    def __init__(self, dht, run_id: str, params, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 compression: str = "fp16", averaging_timeout: float = 60.0, matchmaking_time: float = 5.0,
                 request_timeout: float = 3.0, next_chunk_timeout: float | None = None,
                 target_group_size: int | None = None,
                 client_mode: bool | None = None, start: bool = True, holder: bool = False,
                 declaration_expiration: float = 60.0):
        from convmodel.collaborative.compression import build_compression
        from convmodel.collaborative.exact_allreduce import exact_averager_class

        self.params = [p for p in params]
        problems = [] if self.params else ["no parameters to train"]
        if not outer_lr > 0 or not 0 <= outer_momentum < 1:
            problems.append(f"outer_lr must be > 0 and outer_momentum in [0, 1), got {outer_lr!r}, {outer_momentum!r}")
        if not averaging_timeout > matchmaking_time > request_timeout > 0:  # else every round fails, or stalls
            problems.append("need averaging_timeout > matchmaking_time > request_timeout > 0, got "
                            f"{averaging_timeout!r}, {matchmaking_time!r}, {request_timeout!r}")
        if problems:
            raise ValueError("OuterOptimizer: " + "; ".join(problems))
        with torch.no_grad():
            self.outer = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        for outer in self.outer:
            outer.grad = torch.zeros_like(outer)
        self.optimizer = torch.optim.SGD(self.outer, lr=outer_lr, momentum=outer_momentum, nesterov=True)
        self.compression = compression
        self.averaging_timeout = averaging_timeout
        self.round = 0  # the outer epoch: rounds ended so far
        #: inner steps this peer took in the current round (its caller counts them): saved with the state and
        #: served to joiners, who end their first round with the others instead of H steps after them
        self.inner_step = 0
        self.fallbacks = 0  # rounds whose all-reduce failed or was partial
        self.skipped = 0  # rounds whose local pseudo-gradient was non-finite (not sent)
        self.averager = exact_averager_class()(
            [torch.zeros_like(outer) for outer in self.outer], dht, prefix=f"{run_id}_diloco",
            compression=build_compression(compression, "pseudo_gradient_compression"),
            min_matchmaking_time=matchmaking_time, request_timeout=request_timeout, target_group_size=target_group_size,
            # without a bound, a peer whose groupmate left matchmaking waits for its parts forever (seen here)
            allreduce_timeout=averaging_timeout, next_chunk_timeout=next_chunk_timeout, client_mode=client_mode,
            allow_state_sharing=False, start=False)
        self._elements = sum(outer.numel() for outer in self.outer)
        self._lock = threading.Lock()  # the outer state, between a round and hivemind's state-serving thread
        self.averager.state_source = self._state_to_serve
        #: a holder (`holder=True`) never ends a round: it serves only once it holds a real state (`serve`)
        self.holder = holder
        #: who else trains in this run: the others' offers and client-mode declarations, the dead left out
        self.partners = RoundPartners(self.averager, declaration_expiration, declares=not holder)
        if start:
            self.averager.run_in_background(await_ready=True)
            if not holder:
                self.serve()
                self.partners.declare(self.round)

    def serve(self) -> None:
        """Offer the outer state to joiners (the most advanced peer serves them), at this round's priority."""
        if self.averager.client_mode:
            return
        self.averager.state_sharing_priority = self.round - (HOLDER_PRIORITY_OFFSET if self.holder else 0.0)
        if not self.averager.allow_state_sharing:
            self.averager.allow_state_sharing = True

    # ---- the round -----------------------------------------------------------------------------

    @torch.no_grad()
    def end_round(self, samples: float, average: bool = True) -> RoundResult:
        """After this round's inner steps: average pseudo-gradients, step the outer weights, load them into the model.

        `samples`: the samples this peer trained on this round (its weight in the average; 0 for a peer
        that joined mid-round). `average=False` steps on the local pseudo-gradient alone (a peer that
        knows it is alone). Never raises for a network failure: the local pseudo-gradient is used then.
        """
        fingerprint = self.fingerprint()
        with self.averager.get_tensors() as buffers:
            self._local_pseudo_gradients(buffers)
            sent = all_finite(list(buffers))
            if not sent:  # zeros with weight 0: the groupmates' average is theirs alone
                self.skipped += 1
                print(f"[convmodel] DiLoCo round {self.round}: non-finite pseudo-gradient, not sent "
                      f"(total {self.skipped})", file=sys.stderr, flush=True)
                for buffer in buffers:
                    buffer.zero_()
        weight = float(max(samples, 0)) if sent else 0.0
        gathered = self._all_reduce(weight, fingerprint, sent) if average else None
        averaged = gathered is not None
        if averaged:
            with self.averager.get_tensors() as buffers:
                averaged = all_finite(list(buffers))  # every weight 0 divides by zero
                if averaged:
                    for outer, buffer in zip(self.outer, buffers, strict=True):
                        outer.grad.copy_(buffer)
        fell_back = average and not averaged
        if fell_back:
            self.fallbacks += 1
            print(f"[convmodel] DiLoCo round {self.round}: no all-reduce, the local pseudo-gradient is applied "
                  f"(total {self.fallbacks})", file=sys.stderr, flush=True)
            dead = self.partners.leave_out_dead_peers()
            if dead:
                print(f"[convmodel] DiLoCo: {len(dead)} peer(s) did not answer after the failed round: left out "
                      "until they offer their state again", file=sys.stderr, flush=True)
        if not averaged and sent:
            self._local_pseudo_gradients([outer.grad for outer in self.outer])
        stepped = averaged or sent
        group = gathered if averaged else {}
        agreed = all(data.get("outer") == fingerprint for data in group.values())
        with self._lock:
            if stepped:
                self.optimizer.step()
            self.round += 1
            self.inner_step = 0
        repaired = not agreed and self._repair(self.round - 1)
        self._load_outer_into_params()  # also puts a peer whose weights went non-finite back on track
        if self.averager.allow_state_sharing:
            self.serve()
        result = RoundResult(
            round=self.round - 1, peers=max(len(group), 1),
            samples=sum(float(data.get("samples", 0)) for data in group.values()) if group else weight,
            fell_back=fell_back, sent=sent, stepped=stepped,
            agreed=agreed, repaired=repaired, approx_bytes_sent=self._approx_bytes(len(group)))
        return result

    def _repair(self, round_number: int) -> bool:
        """The round's group held different outer weights (a member had applied its own pseudo-gradient after a
        failed round): the same update kept them apart for good. Every member saw the same fingerprints, so
        all of them now average their outer weights, then their momentum buffers, to the same bytes. Group keys
        "0" + round + part never meet a round's key (a round's bits start with 1, round 0's are "0")."""
        averager = self.averager
        with self._lock:
            state = self.optimizer.state
            momenta = [state[outer].setdefault("momentum_buffer", torch.zeros_like(outer)) for outer in self.outer]
        repaired = True
        for part, targets in (("0", self.outer), ("1", momenta)):
            with averager.get_tensors() as buffers:
                for buffer, target in zip(buffers, targets, strict=True):
                    buffer.copy_(target)
            partial_before = averager.partial_rounds.value
            try:
                averager.set_group_bits("0" + format(round_number, "b") + part)
                gathered = averager.step(gather={"repair": round_number}, weight=1.0, timeout=self.averaging_timeout,
                                         allow_retries=True)
            except Exception as exc:
                print(f"[convmodel] DiLoCo round {round_number}: re-synchronising the outer state failed: {exc!r}",
                      file=sys.stderr, flush=True)
                return False
            if gathered is None or averager.partial_rounds.value != partial_before:
                return False
            with averager.get_tensors() as buffers, self._lock:
                if not all_finite(list(buffers)):
                    return False
                for buffer, target in zip(buffers, targets, strict=True):
                    target.copy_(buffer)
            repaired = repaired and len(gathered) > 1
        return repaired

    def _local_pseudo_gradients(self, out) -> None:
        """out[i] = outer[i] - params[i], in fp32 on the CPU."""
        for buffer, outer, param in zip(out, self.outer, self.params, strict=True):
            buffer.copy_(outer).sub_(param.detach().to("cpu", torch.float32))

    def _all_reduce(self, weight: float, fingerprint: str, sent: bool) -> dict | None:
        """The weighted mean of the group's pseudo-gradients in the averager's buffers, and what each groupmate
        gathered; None when no complete all-reduce happened."""
        averager = self.averager
        partial_before = averager.partial_rounds.value
        try:
            averager.set_group_bits(format(self.round, "b"))  # the group key carries the round
            gathered = averager.step(gather={"samples": weight, "round": self.round, "outer": fingerprint,
                                             "sent": sent},
                                     weight=weight, timeout=self.averaging_timeout, allow_retries=True)
        except Exception as exc:  # no group in time, a peer died mid-round: hivemind logged it
            print(f"[convmodel] DiLoCo round {self.round}: all-reduce failed: {exc!r}", file=sys.stderr, flush=True)
            return None
        if gathered is None or averager.partial_rounds.value != partial_before:
            return None
        if any(not isinstance(data, dict) or data.get("round") != self.round for data in gathered.values()):
            return None  # cannot happen with the round in the key; a peer that sent garbage does not count
        return gathered

    def _load_outer_into_params(self) -> None:
        for param, outer in zip(self.params, self.outer, strict=True):
            param.copy_(outer)

    def _approx_bytes(self, group_size: int) -> int:
        """hivemind's butterfly all-reduce: each peer sends the others' parts of its tensors ((n - 1) / n of them),
        then its averaged part to each of them (as much again). bench/wan_diloco.py measured 1.14x this on the
        interface (framing, the DHT)."""
        if group_size < 2:
            return 0
        per_element = _BYTES_PER_ELEMENT.get(self.compression, 4)
        return int(2 * self._elements * per_element * (group_size - 1) / group_size)

    def fingerprint(self) -> str:
        """A hash of the outer weights: peers that hold the same outer weights have the same one."""
        digest = hashlib.sha1()
        for outer in self.outer:
            digest.update(outer.numpy().tobytes())
        return digest.hexdigest()

    @property
    def pseudo_gradients(self) -> list[torch.Tensor]:
        """The pseudo-gradient the last outer step applied (averaged, or this peer's own after a fallback)."""
        return [outer.grad for outer in self.outer]

    # ---- state for joiners and checkpoints -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Copies, not views: torch's optimizer state_dict holds the live momentum buffers, and another optimizer
        that loads it in this process would share them (its steps and ours would move one buffer twice)."""
        return {"round": self.round, "inner_step": self.inner_step, "outer": [outer.clone() for outer in self.outer],
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any], into_params: bool = True) -> None:
        """Outer weights, outer optimizer state, round and in-round step; the model's parameters become the outer
        weights unless `into_params=False` (a checkpoint taken mid-round holds the model's own inner weights)."""
        weights = state["outer"]
        if len(weights) != len(self.outer) or any(w.shape != o.shape for w, o in zip(weights, self.outer)):
            raise ValueError("OuterOptimizer.load_state_dict: the outer weights' shapes differ from the model's: "
                             f"{[tuple(w.shape) for w in weights]} vs {[tuple(o.shape) for o in self.outer]}")
        with self._lock:
            for outer, weight in zip(self.outer, weights, strict=True):
                outer.copy_(weight)
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # not the caller's buffers
            self.round = int(state["round"])
            self.inner_step = int(state.get("inner_step", 0))
        if into_params:
            self._load_outer_into_params()
        if self.averager.allow_state_sharing:
            self.serve()

    @torch.no_grad()
    def reset_outer_to_params(self) -> None:
        """The outer weights become the model's current parameters (a synchronous run's checkpoint resumed)."""
        with self._lock:
            for outer, param in zip(self.outer, self.params, strict=True):
                outer.copy_(param.detach())

    def _state_to_serve(self) -> tuple[dict, list[torch.Tensor]]:
        """What a joiner downloads: the round, the outer weights, then the momentum buffers (zeros where none yet)."""
        with self._lock:
            buffers = [self.optimizer.state.get(outer, {}).get("momentum_buffer") for outer in self.outer]
            tensors = [outer.clone() for outer in self.outer]
            tensors += [torch.zeros_like(o) if b is None else b.clone() for o, b in zip(self.outer, buffers)]
            return {"round": self.round, "inner_step": self.inner_step, "momentum": [b is not None for b in buffers]}, \
                tensors

    def load_state_from_peers(self, timeout: float | None = None, only_ahead: bool = False,
                              max_round: float = math.inf) -> bool:
        """Take the outer state of the most advanced peer (a joiner; this peer keeps its outer_lr and momentum).

        Returns False, keeping this peer's state, when no peer answered, what it sent does not fit this model,
        (`only_ahead`: a peer resumed from a checkpoint) it is not further along than this peer, or its round
        is above `max_round` (what the swarm's metrics records make plausible: plausibility.py).
        """
        loaded = self.averager.load_state_from_peers(timeout=timeout)
        if loaded is None:
            return False
        metadata, tensors = loaded
        count = len(self.outer)
        fits = (isinstance(metadata, dict) and isinstance(metadata.get("round"), int) and metadata["round"] >= 0
                and isinstance(metadata.get("inner_step", 0), int) and metadata.get("inner_step", 0) >= 0
                and isinstance(metadata.get("momentum"), list) and len(metadata["momentum"]) == count
                and len(tensors) == 2 * count
                and all(t.shape == o.shape for t, o in zip(tensors, self.outer + self.outer))
                and all_finite(list(tensors)))
        if not fits:
            print("[convmodel] refused the DiLoCo state a peer sent: it does not fit this model's parameters",
                  file=sys.stderr, flush=True)
            return False
        if only_ahead and (metadata["round"], metadata.get("inner_step", 0)) <= (self.round, self.inner_step):
            return False
        if metadata["round"] > max_round:
            print(f"[convmodel] refused the DiLoCo state a peer sent: its round {metadata['round']} is implausible "
                  f"(at most {max_round:.0f} now, from the swarm's metrics records)", file=sys.stderr, flush=True)
            return False
        state = {i: {"momentum_buffer": tensors[count + i]} for i, has in enumerate(metadata["momentum"]) if has}
        self.load_state_dict({"round": metadata["round"], "inner_step": metadata.get("inner_step", 0),
                              "outer": tensors[:count],
                              "optimizer": {"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]}})
        return True

    def shutdown(self) -> None:
        if self.averager.is_alive():
            self.partners.goodbye()
            self.averager.shutdown()
