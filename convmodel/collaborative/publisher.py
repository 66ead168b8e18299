"""Keeps a peer's signed metrics record alive in the DHT while the peer runs, and only while it runs.

The record expires `expiration` seconds after each store. A peer stores it at every collaborative
epoch, but epochs can be far apart (and validation or a checkpoint save can pause training), so a
background thread stores the latest record again every `expiration / 2` seconds. A killed peer
stops renewing and drops out of the monitor's count within `expiration` seconds.
"""

import threading


class MetricsPublisher:
    """This peer's latest metrics, re-stored in the background until `close`."""

    def __init__(self, dht, run_id: str, signer, expiration: float):
        self.dht, self.run_id, self.signer, self.expiration = dht, run_id, signer, expiration
        self._record: dict | None = None
        self._pending: list = []  # DHT stores in flight; finished before the DHT shuts down
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="convmodel-metrics", daemon=True)
        self._thread.start()

    def publish(self, epoch: int, samples_per_second: float, samples_accumulated: int, loss: float | None,
                mini_steps: int) -> None:
        """Store a new record now (without waiting for the DHT: a slow store must not slow training)."""
        with self._lock:
            self._record = dict(epoch=epoch, samples_per_second=samples_per_second,
                                samples_accumulated=samples_accumulated, loss=loss, mini_steps=mini_steps)
            self._store()

    def _renew(self) -> None:
        while not self._stop.wait(self.expiration / 2):
            with self._lock:
                if self._record is not None:
                    self._store()

    def _store(self) -> None:
        from convmodel.collaborative.metrics import publish_metrics

        self._pending = [future for future in self._pending if not future.done()]
        self._pending.append(publish_metrics(self.dht, self.run_id, self.signer, **self._record,
                                             expiration=self.expiration))

    def close(self, timeout: float = 5.0) -> None:
        """Stop renewing and wait (bounded) for stores in flight; the record then expires on its own."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            pending, self._pending = self._pending, []
        for future in pending:
            try:
                future.result(timeout=timeout)
            except Exception:  # noqa: S110 (a metrics record lost at exit is harmless)
                pass
