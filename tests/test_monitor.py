"""The swarm monitor: real hivemind DHTs on 127.0.0.1, honest publishers, a forger, TensorBoard read back.

The forger is a DHT with no validators of its own (so it keeps whatever it is given) that plants a
record under an honest peer's public-key subkey, signed with its own key, and pushes a correctly
signed record of the wrong shape straight to the monitor. Every wait is a deadline-bounded poll.
"""

import dataclasses
import time
from functools import partial

import pytest

pytest.importorskip("hivemind")

from hivemind.dht.crypto import RSASignatureValidator  # noqa: E402
from hivemind.dht.schema import SchemaValidator  # noqa: E402
from hivemind.dht.validation import DHTRecord  # noqa: E402
from hivemind.optim.progress_tracker import TrainingProgressSchema  # noqa: E402
from hivemind.utils import MSGPackSerializer, get_dht_time  # noqa: E402
from hivemind.utils.crypto import RSAPrivateKey  # noqa: E402

from convmodel.collaborative.metrics import metrics_validators, publish_metrics  # noqa: E402
from convmodel.collaborative.monitor import (  # noqa: E402
    RejectedRecordCounter,
    SwarmMonitor,
    SwarmSnapshot,
    metrics_key_id,
    monitor_validators,
    split_plausible,
    summarize_records,
)

RUN = "swarm"
LOOPBACK = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], use_ipfs=False, use_relay=False, use_auto_relay=False,
                nat_port_map=False, auto_nat=False)
TAGS = {"swarm/epoch", "swarm/loss", "swarm/alive_peers", "swarm/samples_per_second", "swarm/samples",
        "swarm/rejected_records", "swarm/implausible_records"}
ABSURD = dict(epoch=10**6, samples_per_second=1e9, samples_accumulated=10**12, loss=0.0, mini_steps=1)


def metrics(epoch=3, samples_per_second=12.5, samples_accumulated=40, loss=17.5, mini_steps=7) -> dict:
    return dict(epoch=epoch, samples_per_second=samples_per_second, samples_accumulated=samples_accumulated,
                loss=loss, mini_steps=mini_steps)


def signed_value(subkey: bytes, value: dict, expiration: float, signing_key: RSAPrivateKey, run_id: str = RUN) -> bytes:
    """The bytes a DHT node holds for `{RUN}_metrics`[subkey]: the value and a signature made with `signing_key`.

    With the subkey owner's key this is what hivemind's RSASignatureValidator.sign_value writes; with
    any other key it is a forgery.
    """
    value_bytes = MSGPackSerializer.dumps(value)
    record = DHTRecord(metrics_key_id(run_id), MSGPackSerializer.dumps(subkey), value_bytes, expiration)
    signature = signing_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
    return value_bytes + RSASignatureValidator.SIGNATURE_FORMAT.replace(b"_value_", signature)


def owner_subkey(key: RSAPrivateKey) -> bytes:
    return RSASignatureValidator(key).local_public_key


async def plant(_dht, node, subkey: bytes, value: bytes, expiration: float, run_id: str = RUN) -> bool:
    """In the forger's DHT process: put raw bytes into its own storage, where searches will find them."""
    from hivemind.dht.routing import DHTID

    return node.protocol.storage.store_subkey(DHTID.from_bytes(metrics_key_id(run_id)), subkey, value, expiration)


async def push(_dht, node, peer_id, subkey: bytes, value: bytes, expiration: float):
    """In the forger's DHT process: ask `peer_id` to store raw bytes (its store_ok list, [False] if refused)."""
    from hivemind.dht.routing import DHTID

    store_ok = await node.protocol.call_store(peer_id, [DHTID.from_bytes(metrics_key_id(RUN))], [value],
                                              [expiration], subkeys=[subkey])
    return None if store_ok is None else list(store_ok)  # a protobuf field does not pickle


def start_dht(initial_peers=(), validators=()):
    import hivemind

    return hivemind.DHT(start=True, initial_peers=list(initial_peers), record_validators=list(validators),
                        **LOOPBACK)


def addresses(dht) -> list[str]:
    return [str(a) for a in dht.get_visible_maddrs()]


def refresh_until(monitor: SwarmMonitor, condition, timeout: float, what: str) -> SwarmSnapshot | None:
    deadline = time.monotonic() + timeout
    snapshot = None
    while time.monotonic() < deadline:
        snapshot = monitor.refresh()
        if condition(snapshot):
            return snapshot
        time.sleep(0.2)
    pytest.fail(f"no refresh showed {what} within {timeout} s; the last snapshot: {snapshot}")


def logged_scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} in the order written, read back as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def shut_down(dhts: list) -> None:
    for dht in reversed(dhts):
        dht.shutdown()


# ---- without a network ------------------------------------------------------------------------------------


def test_snapshot_sums_records_and_averages_loss_per_local_step():
    """Mean loss = sum(loss) / sum(mini_steps) over records with a loss; the rest still count as peers."""
    records = [metrics(epoch=3, samples_per_second=12.5, samples_accumulated=40, loss=17.5, mini_steps=7),
               metrics(epoch=2, samples_per_second=8.0, samples_accumulated=24, loss=10.0, mini_steps=5),
               metrics(epoch=3, samples_per_second=1.5, samples_accumulated=4, loss=None, mini_steps=9)]
    assert summarize_records(records, rejected_records=4) == SwarmSnapshot(
        epoch=3, loss=27.5 / 12, alive_peers=3, samples_per_second=22.0, samples=68, rejected_records=4)
    assert summarize_records(records[2:], rejected_records=0).loss is None
    assert summarize_records([], rejected_records=1) is None


def test_one_liar_beside_one_honest_peer_moves_no_number():
    """Honest + liar: the majority epoch is the lower one, an absurd epoch is implausible, an absurd loss
    (1e30, NaN, negative) is left out, and a liar's samples count at most 10x the honest peer's."""
    honest = metrics(epoch=7, samples_per_second=10.0, samples_accumulated=300, loss=12.0, mini_steps=4)
    assert summarize_records([honest, metrics(epoch=5)], 0).epoch == 5  # a lower liar holds it back, no more
    plausible, implausible = split_plausible([honest, ABSURD])
    assert plausible == [honest] and implausible == [ABSURD]
    assert split_plausible([honest, metrics(epoch=9)], max_epoch=8.5)[1] == [metrics(epoch=9)]  # too soon
    for absurd_loss in (1e30, float("nan"), float("inf"), -5.0, 0.0):
        liar = metrics(epoch=7, samples_per_second=1e9, samples_accumulated=10**12, loss=absurd_loss, mini_steps=1)
        snapshot = summarize_records([honest, liar], 0, target_batch_size=64)
        assert snapshot.loss == 3.0, (absurd_loss, snapshot)
        assert snapshot.samples_per_second == 10.0 + 100.0  # the liar capped at 10x the lower median
        assert snapshot.samples == 300 + 2 * 64 * 8  # no peer holds more than 2 x target per epoch so far
        assert snapshot.epoch == 7 and snapshot.alive_peers == 2


def test_counter_rejects_forged_signatures_and_bad_shapes_once_each():
    """The counter's verdicts match hivemind's checks; a record seen again is not counted again."""
    owner, forger = RSAPrivateKey(), RSAPrivateKey()
    counter = RejectedRecordCounter(RUN)
    expiration = get_dht_time() + 600

    def record(subkey: bytes, value: dict, key: RSAPrivateKey) -> DHTRecord:
        return DHTRecord(metrics_key_id(RUN), MSGPackSerializer.dumps(subkey),
                         signed_value(subkey, value, expiration, key), expiration)

    honest = record(owner_subkey(owner), metrics(), owner)
    forged = record(owner_subkey(owner), metrics(epoch=99, loss=0.0), forger)
    misshapen = record(owner_subkey(forger), {**metrics(), "epoch": "three"}, forger)
    assert counter.validate(honest) and counter.rejected == 0
    assert not counter.validate(forged) and counter.rejected == 1
    assert not counter.validate(forged) and counter.rejected == 1
    assert not counter.validate(misshapen) and counter.rejected == 2
    other_key = DHTRecord(b"another key", MSGPackSerializer.dumps(None), b"anything", expiration)
    assert counter.validate(other_key) and counter.rejected == 2


# ---- real DHTs ---------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_monitor_sums_honest_peers_and_counts_forged_and_implausible_records(tmp_path):
    """Two honest publishers, a forger that neighbours the monitor, and liars: the numbers are the honest ones.

    A liar is a real peer identity: its record, with epoch 10**6, is validly signed by its own key (as
    metrics.py's signer does), so only plausibility can leave it out. One liar is outvoted; three liars
    are the majority, and their epoch is beyond what the seconds since the last accepted epoch allow.
    """
    first_key, second_key, forger_key = RSAPrivateKey(), RSAPrivateKey(), RSAPrivateKey()
    dhts, monitor = [], None
    try:
        dhts.append(forger := start_dht())  # no validators: it keeps and serves anything
        dhts.append(monitor_dht := start_dht(addresses(forger), monitor_validators(RUN)))
        # as in an auxiliary peer that assists in averaging: hivemind's optimizer adds its progress validators
        monitor_dht.add_validators([SchemaValidator(TrainingProgressSchema, prefix=RUN), RSASignatureValidator()])
        first_validators, first_signer = metrics_validators(RUN, first_key)
        dhts.append(first := start_dht(addresses(monitor_dht), first_validators))
        second_validators, second_signer = metrics_validators(RUN, second_key)
        dhts.append(second := start_dht(addresses(forger), second_validators))
        liar_validators, liar_signer = metrics_validators(RUN, RSAPrivateKey())
        dhts.append(liar := start_dht(addresses(monitor_dht), liar_validators))
        monitor = SwarmMonitor(monitor_dht, RUN, str(tmp_path / "tb"))

        assert publish_metrics(first, RUN, first_signer, **metrics(epoch=3, samples_per_second=12.5,
                               samples_accumulated=40, loss=17.5, mini_steps=7)).result(timeout=30)
        assert publish_metrics(second, RUN, second_signer, **metrics(epoch=2, samples_per_second=8.0,
                               samples_accumulated=24, loss=10.0, mini_steps=5)).result(timeout=30)
        # the forger claims the first peer's subkey with numbers that would dominate every sum, signed with
        # its own key and expiring later than the honest record (so it wins wherever it is not checked)
        expiration = get_dht_time() + 900
        forged = signed_value(first_signer.local_public_key, metrics(epoch=99, samples_per_second=1e6,
                              samples_accumulated=10**6, loss=0.0, mini_steps=1), expiration, forger_key)
        assert forger.run_coroutine(partial(plant, subkey=first_signer.local_public_key, value=forged,
                                            expiration=expiration))
        snapshot = refresh_until(monitor, lambda s: s is not None and s.alive_peers == 2 and s.rejected_records >= 1,
                                 60, "both honest peers and the forged record rejected")
        # the swarm epoch is the one a majority reaches: of 3 and 2, the 2
        honest = SwarmSnapshot(epoch=2, loss=pytest.approx((17.5 + 10.0) / (7 + 5)), alive_peers=2,
                               samples_per_second=20.5, samples=64, rejected_records=1)
        assert snapshot == honest
        # the forger answers every search with its record again; it is still counted once
        assert monitor.refresh() == honest

        # it also pushes a record of the wrong shape, correctly signed under its own key, to the monitor
        misshapen = signed_value(owner_subkey(forger_key), {**metrics(), "epoch": "three"}, expiration, forger_key)
        assert forger.run_coroutine(partial(push, peer_id=monitor_dht.peer_id, subkey=owner_subkey(forger_key),
                                            value=misshapen, expiration=expiration)) == [False]
        assert monitor.refresh() == dataclasses.replace(honest, rejected_records=2)

        # a liar publishes a validly self-signed record at epoch 10**6: outvoted, counted as implausible
        assert publish_metrics(liar, RUN, liar_signer, **ABSURD).result(timeout=30)
        snapshot = refresh_until(monitor, lambda s: s is not None and s.implausible_records >= 1, 60,
                                 "the liar's record judged implausible")
        assert snapshot == dataclasses.replace(honest, rejected_records=2, implausible_records=1)
        # two more liars make three of five: a majority, but 10**6 epochs in seconds is not plausible. Their
        # records sit on a node of their own (hivemind drops a node's whole answer when one subkey in it fails
        # validation, so beside the forger's record they would never be seen), which also stores them on the
        # monitor's node: whether a search reaches the liars' node depended on the routing (failed 2 runs of 4)
        dhts.append(liars := start_dht(addresses(monitor_dht)))
        for key in (RSAPrivateKey(), RSAPrivateKey()):
            value = signed_value(owner_subkey(key), ABSURD, expiration, key)  # as the owner's validator signs
            assert liars.run_coroutine(partial(plant, subkey=owner_subkey(key), value=value, expiration=expiration))
            assert liars.run_coroutine(partial(push, peer_id=monitor_dht.peer_id, subkey=owner_subkey(key),
                                               value=value, expiration=expiration)) == [True]
        snapshot = refresh_until(monitor, lambda s: s is not None and s.implausible_records >= 3, 60,
                                 "three liars' records judged implausible")
        assert snapshot == dataclasses.replace(honest, rejected_records=2, implausible_records=3)
        assert monitor.refresh() == snapshot  # each counted once however often it is read
    finally:
        if monitor is not None:
            monitor.close()
        shut_down(dhts)

    scalars = logged_scalars(tmp_path / "tb")
    assert set(scalars) == TAGS, scalars
    last = {tag: points[-1] for tag, points in scalars.items()}
    assert last == {"swarm/epoch": (2, 2.0), "swarm/loss": (2, pytest.approx(27.5 / 12, rel=1e-6)),
                    "swarm/alive_peers": (2, 2.0), "swarm/samples_per_second": (2, 20.5),
                    "swarm/samples": (2, 64.0), "swarm/rejected_records": (2, 2.0),
                    "swarm/implausible_records": (2, 3.0)}, scalars
    # no TensorBoard step and no swarm/epoch ever came from a liar's record
    assert {step for points in scalars.values() for step, _ in points} == {2}, scalars
    assert {value for _, value in scalars["swarm/epoch"]} == {2.0}, scalars


@pytest.mark.timeout(120)
def test_monitor_follows_a_rising_epoch_and_drops_an_expired_record(tmp_path, capsys):
    """One peer publishes epochs 1 and 2 with a short expiration, then stops: the monitor sees it go."""
    expiration = 8.0  # long enough for a loaded machine to see each record before it expires
    dhts, monitor = [], None
    try:
        dhts.append(monitor_dht := start_dht(validators=monitor_validators(RUN)))
        validators, signer = metrics_validators(RUN, RSAPrivateKey())
        dhts.append(peer := start_dht(addresses(monitor_dht), validators))
        with pytest.raises(ValueError, match="monitor_validators"):
            SwarmMonitor(peer, RUN, None)  # a trainer's DHT has no counter: the monitor says so at once

        monitor = SwarmMonitor(monitor_dht, RUN, str(tmp_path / "tb"))
        assert monitor.refresh() is None
        for epoch in (1, 2):
            assert publish_metrics(peer, RUN, signer, **metrics(epoch=epoch, samples_per_second=4.0 * epoch,
                                   samples_accumulated=8, loss=6.0, mini_steps=3),
                                   expiration=expiration).result(timeout=30)
            snapshot = refresh_until(monitor, lambda s, e=epoch: s is not None and s.epoch == e, expiration,
                                     f"epoch {epoch}")
            assert snapshot == SwarmSnapshot(epoch=epoch, loss=2.0, alive_peers=1, samples_per_second=4.0 * epoch,
                                             samples=8, rejected_records=0)
        refresh_until(monitor, lambda s: s is None, 60, "the record expiring")
    finally:
        if monitor is not None:
            monitor.close()
        shut_down(dhts)

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[convmodel] swarm")]
    assert lines == ["[convmodel] swarm 'swarm': no alive peer (no valid metrics record)",
                     "[convmodel] swarm 'swarm': epoch 1, 1 peer, loss 2.0000, 4.0 samples/s",
                     "[convmodel] swarm 'swarm': epoch 2, 1 peer, loss 2.0000, 8.0 samples/s",
                     "[convmodel] swarm 'swarm': no alive peer (no valid metrics record)"], lines
    scalars = logged_scalars(tmp_path / "tb")
    assert scalars["swarm/epoch"] == [(1, 1.0), (2, 2.0), (2, 2.0)], scalars
    assert scalars["swarm/alive_peers"] == [(1, 1.0), (2, 1.0), (2, 0.0)], scalars
    assert scalars["swarm/samples_per_second"] == [(1, 4.0), (2, 8.0), (2, 0.0)], scalars
    assert scalars["swarm/loss"] == [(1, 2.0), (2, 2.0)], scalars  # no loss once nobody reports one
