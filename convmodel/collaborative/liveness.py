"""A peer that died stops counting after the first averaging round it made fail, not when its report expires.

hivemind counts a peer for as long as its progress record lives in the DHT (metadata_expiration):
a SIGKILLed peer kept the survivors averaging "with" it, each round waiting averaging_timeout for
it, three rounds and 26 s in all on the shipped bert-tiny config. Its connections closed when it
died, so one ping tells. After a failed round, the tracker here pings every other peer that has a
progress record (through this peer's DHT, each ping bounded by the DHT's request timeout), leaves
out those that do not answer, and fetches the swarm's progress again at once. A peer left out comes
back as soon as it publishes a newer record than the one it was left out with, so a slow answer
costs it a round, not its place. Client-mode peers serve no DHT requests, so they are never pinged
(one that dies is still dropped only when its record expires).

A peer that leaves cleanly is dropped by the others' next fetch: its goodbye record (value None) is
stored before the tracker's shutdown returns. hivemind sent it without waiting, and the DHT shut
down right after could drop it; the survivors then counted the leaver for 10 s more (CI, 3 peers).
"""

import asyncio
import sys
import threading
import time
from functools import partial

_TRACKER_CLASS = None
GOODBYE_STORE_S = 3.0  # hivemind's DHT request timeout: a store that takes longer reached no one


async def unanswered(_dht, node, peer_ids: list[bytes]) -> list[bytes]:
    """Runs in the DHT's process: which of the peers did not answer a ping."""
    from hivemind.p2p import PeerID

    answers = await asyncio.gather(*(node.protocol.call_ping(PeerID(peer_id)) for peer_id in peer_ids))
    return [peer_id for peer_id, answer in zip(peer_ids, answers) if answer is None]


def live_progress_tracker_class():
    """hivemind's ProgressTracker that leaves out peers found dead (built once, on first use)."""
    global _TRACKER_CLASS
    if _TRACKER_CLASS is None:
        from hivemind.optim.progress_tracker import ProgressTracker

        class LiveProgressTracker(ProgressTracker):
            """ProgressTracker whose swarm progress leaves out the peers that `check_peers` found dead."""

            def __init__(self, *args, **kwargs):
                self.gone: dict[bytes, float] = {}  # peer id -> time of the record it was left out with
                self._last_records: dict = {}
                self._checking = threading.Lock()
                super().__init__(*args, **kwargs)

            def _parse_swarm_progress_data(self, metadata):
                if isinstance(metadata, dict):
                    self._last_records = metadata
                    metadata = {key: entry for key, entry in metadata.items() if not self._left_out(entry)}
                return super()._parse_swarm_progress_data(metadata)

            def _left_out(self, entry) -> bool:
                progress = getattr(entry, "value", None)
                if not isinstance(progress, dict) or progress.get("peer_id") not in self.gone:
                    return False
                if progress.get("time", 0) > self.gone[progress["peer_id"]]:  # it reported again: alive
                    self.gone.pop(progress["peer_id"], None)
                    return False
                return True

            def shutdown(self, timeout: float | None = None):
                """hivemind's shutdown, waiting (at most GOODBYE_STORE_S) until the goodbye record is stored."""
                from hivemind.utils import get_dht_time

                self.shutdown_triggered.set()
                self.should_report_progress.set()
                self.global_state_updated.set()
                self.shutdown_complete.wait(timeout)
                started = time.monotonic()
                stored = self.dht.store(self.training_progress_key, subkey=self._local_public_key, value=None,
                                        expiration_time=get_dht_time() + self.metadata_expiration,
                                        return_future=True)
                try:
                    why = None if stored.result(timeout=GOODBYE_STORE_S) else "no peer took it"
                except Exception as exc:  # a timeout, or a DHT already shutting down
                    why = type(exc).__name__
                if why is not None:
                    print(f"[convmodel] the goodbye record was not stored in {time.monotonic() - started:.1f} s "
                          f"({why}): the other peers count this one until its report expires", file=sys.stderr,
                          flush=True)

            def check_peers(self) -> None:
                """Ping the other peers now, in the caller's thread: hivemind logs a failed gradient round and
                then decides at once whether to average the state, from the peers this tracker counts."""
                if not self._checking.acquire(blocking=False):
                    return  # a check is under way in another thread
                try:
                    self._check()
                except Exception as exc:  # a DHT shutting down: the records expire on their own
                    print(f"[convmodel] checking the other peers: {type(exc).__name__}: {exc}", file=sys.stderr,
                          flush=True)
                finally:
                    self._checking.release()

            def _check(self) -> None:
                own = self.dht.peer_id.to_bytes()
                records = {}
                for entry in list(self._last_records.values()):
                    progress = getattr(entry, "value", None)
                    if (isinstance(progress, dict) and isinstance(progress.get("peer_id"), bytes)
                            and progress["peer_id"] != own and not progress.get("client_mode")
                            and progress["peer_id"] not in self.gone):
                        records[progress["peer_id"]] = progress.get("time", 0.0)
                if not records:
                    return
                dead = self.dht.run_coroutine(partial(unanswered, peer_ids=list(records)))
                if not dead:
                    return
                for peer_id in dead:
                    self.gone[peer_id] = records[peer_id]
                # count without them from now on, not from the next fetch. Not under lock_global_progress: a
                # failed gradient round is logged inside hivemind's pause_updates, which holds it (a deadlock)
                self.global_progress = self._parse_swarm_progress_data(self._last_records)
                names = ", ".join(_peer_name(peer_id) for peer_id in dead)
                print(f"[convmodel] {names} did not answer after a failed averaging round: no longer counted "
                      "until it reports again", file=sys.stderr, flush=True)

        _TRACKER_CLASS = LiveProgressTracker
    return _TRACKER_CLASS


def _peer_name(peer_id: bytes) -> str:
    from hivemind.p2p import PeerID

    return f"peer {PeerID(peer_id).to_base58()}"
