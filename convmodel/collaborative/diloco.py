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
import sys
from dataclasses import dataclass
from typing import Any

import torch

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
    approx_bytes_sent: int  # this peer's share of the all-reduce, estimated from the compression (received: the same)


class OuterOptimizer:
    """DiLoCo's outer optimizer over a model's parameters: fp32 CPU outer weights, SGD(nesterov), an averager.

    `params`: the model's parameters (any device or dtype); they are overwritten with the outer weights
    at the end of every round. The outer weights start as a copy of them: every peer must start from the
    same weights (or load another peer's `state_dict`).
    """

    def __init__(self, dht, run_id: str, params, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                 compression: str = "fp16", averaging_timeout: float = 60.0, matchmaking_time: float = 5.0,
                 request_timeout: float = 3.0, client_mode: bool | None = None, start: bool = True):
        from convmodel.collaborative.compression import build_compression
        from convmodel.collaborative.exact_allreduce import exact_averager_class

        self.params = [p for p in params]
        if not self.params:
            raise ValueError("OuterOptimizer: no parameters to train")
        with torch.no_grad():
            self.outer = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        for outer in self.outer:
            outer.grad = torch.zeros_like(outer)
        self.optimizer = torch.optim.SGD(self.outer, lr=outer_lr, momentum=outer_momentum, nesterov=True)
        self.compression = compression
        self.averaging_timeout = averaging_timeout
        self.round = 0  # the outer epoch: rounds ended so far
        self.fallbacks = 0  # rounds whose all-reduce failed or was partial
        self.skipped = 0  # rounds whose local pseudo-gradient was non-finite (not sent)
        self.averager = exact_averager_class()(
            [torch.zeros_like(outer) for outer in self.outer], dht, prefix=f"{run_id}_diloco",
            compression=build_compression(compression, "pseudo_gradient_compression"),
            min_matchmaking_time=matchmaking_time, request_timeout=request_timeout,
            client_mode=client_mode, allow_state_sharing=False, start=start)
        self._elements = sum(outer.numel() for outer in self.outer)

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
        if not averaged and sent:
            self._local_pseudo_gradients([outer.grad for outer in self.outer])
        stepped = averaged or sent
        if stepped:
            self.optimizer.step()
        self._load_outer_into_params()  # also puts a peer whose weights went non-finite back on track
        group = gathered if averaged else {}
        result = RoundResult(
            round=self.round, peers=max(len(group), 1),
            samples=sum(float(data.get("samples", 0)) for data in group.values()) if group else weight,
            fell_back=fell_back, sent=sent, stepped=stepped,
            agreed=all(data.get("outer") == fingerprint for data in group.values()),
            approx_bytes_sent=self._approx_bytes(len(group)))
        self.round += 1
        return result

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
        if group_size < 2:
            return 0
        per_element = _BYTES_PER_ELEMENT.get(self.compression, 4)
        return int(self._elements * per_element * (group_size - 1) / group_size)

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
        return {"round": self.round, "outer": [outer.clone() for outer in self.outer],
                "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Outer weights, outer optimizer state and round counter; the model's parameters become the outer weights."""
        weights = state["outer"]
        if len(weights) != len(self.outer) or any(w.shape != o.shape for w, o in zip(weights, self.outer)):
            raise ValueError("OuterOptimizer.load_state_dict: the outer weights' shapes differ from the model's: "
                             f"{[tuple(w.shape) for w in weights]} vs {[tuple(o.shape) for o in self.outer]}")
        for outer, weight in zip(self.outer, weights, strict=True):
            outer.copy_(weight)
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # not the caller's buffers
        self.round = int(state["round"])
        self._load_outer_into_params()

    def shutdown(self) -> None:
        if self.averager.is_alive():
            self.averager.shutdown()

