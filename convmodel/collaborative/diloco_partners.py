"""Who else trains in a DiLoCo run: the peers a round can average with, found in the DHT.

A training peer that accepts connections offers its outer state (hivemind's `all_averagers` key,
its round as the priority); a client-mode peer cannot offer, so it declares itself under
`{prefix}.clients` instead. A holder that trains nothing (the auxiliary peer) offers half a round
below (HOLDER_PRIORITY_OFFSET): joiners prefer a trainer at the same round, and trainers do not
wait for a holder in a round. hivemind's averagers re-declare every 30 s, so a killed peer's offer
outlives it: after a failed round the offering peers are pinged and the dead left out until they
offer again. A killed client-mode peer (which answers no DHT ping) counts until its declaration expires.
"""

import math
import sys

#: a holder offers its state at round - HOLDER_PRIORITY_OFFSET; trainers' offers are whole rounds
HOLDER_PRIORITY_OFFSET = 0.5


def is_trainer_offer(priority) -> bool:
    """A state offer from a training peer: a whole round as its priority (a holder's is half a round lower;
    None: not offering)."""
    return isinstance(priority, int | float) and math.isfinite(priority) and float(priority).is_integer()


class RoundPartners:
    """The other training peers of `averager`'s run; `declares`: this peer is a trainer (declares in client mode)."""

    def __init__(self, averager, declaration_expiration: float = 60.0, declares: bool = True):
        self.averager, self.declaration_expiration, self.declares = averager, declaration_expiration, declares
        self.dead: dict[bytes, float] = {}  # peer id -> expiration of the offer it was found dead with
        self._declared_until = -math.inf

    @property
    def _clients_key(self) -> str:
        return f"{self.averager.prefix}.clients"

    def declare(self, round_number: int) -> None:
        """A client-mode peer says that it trains in this run (renewed when half its expiration is gone: call it
        every inner step). Without it a server whose only partners are client-mode peers would think it is
        alone and never average with them."""
        from hivemind.utils import get_dht_time

        if not self.averager.client_mode or not self.declares:
            return
        now = get_dht_time()
        if now < self._declared_until - self.declaration_expiration / 2:
            return
        self._declared_until = now + self.declaration_expiration
        self.averager.dht.store(self._clients_key, subkey=self.averager.peer_id.to_bytes(), value=round_number,
                                expiration_time=self._declared_until, return_future=True)

    def goodbye(self) -> None:
        """A client-mode peer that leaves takes its declaration back (its partners stop waiting for it at once)."""
        from hivemind.utils import get_dht_time

        if self._declared_until == -math.inf:
            return
        try:
            self.averager.dht.store(self._clients_key, subkey=self.averager.peer_id.to_bytes(), value=None,
                                    expiration_time=get_dht_time() + self.declaration_expiration,
                                    return_future=True).result(timeout=3.0)
        except Exception:  # noqa: S110 (the declaration then expires on its own)
            pass

    def any(self) -> bool:
        """Whether another live training peer offers its outer state or declares itself in client mode."""
        return bool(self._offering()) or bool(self._clients())

    def _clients(self) -> list[bytes]:
        found = self.averager.dht.get(self._clients_key, latest=True)
        own = self.averager.peer_id.to_bytes()
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        return [key for key, entry in entries.items() if key != own and getattr(entry, "value", None) is not None]

    def _offering(self) -> dict[bytes, float]:
        """peer id -> expiration of its offer, for the other trainers offering state and not found dead since."""
        found = self.averager.dht.get(f"{self.averager.prefix}.all_averagers", latest=True)
        own = self.averager.peer_id.to_bytes()
        entries = found.value if found is not None and isinstance(found.value, dict) else {}
        others = {key: entry.expiration_time for key, entry in entries.items()
                  if key != own and is_trainer_offer(getattr(entry, "value", None))}
        return {key: expires for key, expires in others.items() if self.dead.get(key, -1.0) < expires}

    def leave_out_dead_peers(self) -> list[bytes]:
        """After a failed round: ping the trainers offering state, leave out those that do not answer until they
        offer again (a newer declaration). Returns the ones left out now."""
        from functools import partial

        from convmodel.collaborative.liveness import unanswered

        others = self._offering()
        if not others:
            return []
        try:
            dead = self.averager.dht.run_coroutine(partial(unanswered, peer_ids=list(others)))
        except Exception as exc:  # a DHT shutting down
            print(f"[convmodel] checking the other DiLoCo peers: {type(exc).__name__}: {exc}", file=sys.stderr,
                  flush=True)
            return []
        for peer_id in dead:
            self.dead[peer_id] = others[peer_id]
        return dead
