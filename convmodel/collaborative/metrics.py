"""Each peer's training metrics as a signed, schema-checked DHT record under `{run_id}_metrics`.

One subkey per peer, holding its RSA public key: hivemind's RSASignatureValidator lets only
the key's owner write that subkey, and SchemaValidator rejects records of the wrong shape, so
a monitor can sum samples/s and average loss over peers without trusting any one of them.
The schema uses pydantic.v1 because hivemind's SchemaValidator does.
"""

METRICS_EXPIRATION_S = 600.0  # a peer that stops publishing drops out of the sums after this


def metrics_schema():
    """The pydantic (v1) schema of the `{run_id}_metrics` key, built lazily (hivemind is heavy)."""
    from hivemind.dht.schema import BytesWithPublicKey
    from pydantic.v1 import BaseModel, StrictFloat, confloat, conint

    class LocalMetrics(BaseModel):
        """One peer's numbers at the end of a collaborative epoch."""

        epoch: conint(ge=0, strict=True)
        samples_per_second: confloat(ge=0.0, strict=True)
        samples_accumulated: conint(ge=0, strict=True)
        loss: StrictFloat | None
        mini_steps: conint(ge=0, strict=True)

    class MetricsSchema(BaseModel):
        metrics: dict[BytesWithPublicKey, LocalMetrics | None]

    return LocalMetrics, MetricsSchema


def metrics_validators(run_id: str, private_key=None):
    """(record validators for the DHT, this peer's signature validator) for `{run_id}_metrics`.

    `private_key` (a hivemind RSAPrivateKey) defaults to the process-wide key hivemind makes for each
    process, so two trainer processes sign as two peers.
    """
    from hivemind.dht.crypto import RSASignatureValidator
    from hivemind.dht.schema import SchemaValidator

    _, schema = metrics_schema()
    signer = RSASignatureValidator(private_key)
    return [SchemaValidator(schema, prefix=run_id), signer], signer


def publish_metrics(dht, run_id: str, signer, epoch: int, samples_per_second: float, samples_accumulated: int,
                    loss: float | None, mini_steps: int, expiration: float = METRICS_EXPIRATION_S):
    """Store this peer's metrics without waiting for the DHT (a slow store must not slow training).

    The record lives `expiration` seconds unless re-published (a later publish replaces it), so a
    peer that dies drops out of the swarm's sums. Returns the store's future; wait for it before
    shutting the DHT down.
    """
    import math

    from hivemind.utils import get_dht_time

    local_metrics, _ = metrics_schema()
    record = local_metrics(
        epoch=int(epoch), samples_per_second=float(max(samples_per_second, 0.0)),
        samples_accumulated=int(samples_accumulated),
        loss=float(loss) if loss is not None and math.isfinite(loss) else None, mini_steps=int(mini_steps))
    return dht.store(key=f"{run_id}_metrics", subkey=signer.local_public_key, value=record.dict(),
              expiration_time=get_dht_time() + expiration, return_future=True)


def read_metrics(dht, run_id: str) -> dict[bytes, dict]:
    """{peer public key: metrics} of every peer whose record has not expired.

    The DHT returns only records its validators accepted; with `latest=True` it asks every node
    near the key, so a record one node lost is still found on another.
    """
    from hivemind.utils import get_dht_time

    found = dht.get(f"{run_id}_metrics", latest=True)
    if found is None or not isinstance(found.value, dict):
        return {}
    now = get_dht_time()
    return {key: entry.value for key, entry in found.value.items()
            if isinstance(entry.value, dict) and entry.expiration_time >= now}
