"""The swarm's dashboard: every peer's signed metrics record, judged, summed, printed and logged to TensorBoard.

The auxiliary peer starts its DHT with `monitor_validators(run_id)`, creates a `SwarmMonitor` on it
and calls `refresh()` in its loop. Each refresh reads the `{run_id}_metrics` records (one per peer,
see metrics.py), leaves out the implausible ones and sums the rest robustly into a `SwarmSnapshot`
(plausibility.py: a record is self-signed, so anyone can write one with any numbers), prints one
line when the line changes and logs the swarm/* scalars when the snapshot changes.

Rejected records are counted inside the DHT: hivemind checks a record when another node asks to
store it here and when another node's answer to our search carries it, and drops a failing record
without a word. `RejectedRecordCounter` is a record validator that runs before hivemind's own, checks
our key with the same signature and schema checks, and counts each distinct failing record once.
It lives in the DHT's process (a forked child), so the monitor reads its count with
`dht.run_coroutine`.

hivemind's validator base class is imported at module level because the counter must be a
module-level subclass of it; this module is the auxiliary peer's, which needs hivemind anyway.
"""

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from functools import partial

from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase

from convmodel.collaborative.metrics import metrics_validators, read_metrics
from convmodel.collaborative.plausibility import (
    MAX_LEAD,
    SAMPLES_FACTOR,
    EpochClock,
    lower_median,
    majority_epoch,
    plausible_mean_loss,
)

REMEMBERED_REJECTIONS = 65_536  # digests kept to count a record once; past this, repeats count again


def metrics_key_id(run_id: str) -> bytes:
    """The DHT's id of the `{run_id}_metrics` key, as validators see it in `DHTRecord.key`."""
    from hivemind.dht.routing import DHTID

    return DHTID.generate(source=f"{run_id}_metrics").to_bytes()


class RejectedRecordCounter(RecordValidatorBase):
    """Checks `{run_id}_metrics` records before hivemind's validators do and counts those that fail.

    The checks are its own RSASignatureValidator and SchemaValidator, so its verdict is the one the
    DHT would reach; returning False drops the record as hivemind would. Records under other keys
    pass through untouched (hivemind's other validators judge them). A failing record is counted
    once however often it is seen: a forger's record comes back in every search, and the count should
    say how many bad records there were, not how often we asked. Digests are kept until the record
    expires, at most REMEMBERED_REJECTIONS of them.
    """

    def __init__(self, run_id: str):
        own_validators, _ = metrics_validators(run_id)  # separate instances: hivemind merges into its own
        self.key_id = metrics_key_id(run_id)
        self.rejected = 0
        self._checks = CompositeValidator(own_validators)
        self._seen: dict[bytes, float] = {}  # digest of a rejected record -> its expiration time

    def validate(self, record: DHTRecord) -> bool:
        if record.key != self.key_id:
            return True
        try:
            valid = self._checks.validate(record)
        except Exception:  # a malformed public key or value can make a check raise: invalid all the same
            valid = False
        if not valid:
            self._count(record)
        return valid

    def _count(self, record: DHTRecord) -> None:
        from hivemind.utils import MSGPackSerializer, get_dht_time

        digest = hashlib.sha256(MSGPackSerializer.dumps(dataclasses.astuple(record))).digest()
        if digest in self._seen:
            return
        self.rejected += 1
        if len(self._seen) >= REMEMBERED_REJECTIONS:
            now = get_dht_time()
            self._seen = {d: expiration for d, expiration in self._seen.items() if expiration >= now}
        if len(self._seen) < REMEMBERED_REJECTIONS:
            self._seen[digest] = record.expiration_time

    @property
    def priority(self) -> int:
        return 20  # above RSASignatureValidator's 10: validation runs in decreasing priority

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, RejectedRecordCounter) and other.key_id == self.key_id  # one counter is enough


def monitor_validators(run_id: str) -> list:
    """The record validators a monitoring peer's DHT must start with: the metrics record's own
    (schema, signature) and the RejectedRecordCounter.

    Pass them when the DHT starts (`start_dht(..., record_validators=...)` or
    `hivemind.DHT(record_validators=...)`), not through `DHT.add_validators`: the schema classes are
    built at run time and cannot be pickled into a running DHT's process. Validators that hivemind
    adds later (its optimizer's progress schema) merge with these.
    """
    validators, _ = metrics_validators(run_id)
    return [*validators, RejectedRecordCounter(run_id)]


async def _rejected_in_dht(_dht, node, key_id: bytes) -> int | None:
    """Runs in the DHT's process: the counter's count, or None if the DHT has no counter for the key."""
    validator = node.protocol.record_validator
    for candidate in getattr(validator, "_validators", [validator]):  # CompositeValidator's list
        if isinstance(candidate, RejectedRecordCounter) and candidate.key_id == key_id:
            return candidate.rejected
    return None


@dataclass
class SwarmSnapshot:
    """The swarm as its valid, unexpired and plausible metrics records describe it at one refresh
    (plausibility.py says what is plausible and why)."""

    epoch: int  # the highest collaborative epoch a strict majority of plausible records reach
    loss: float | None  # sum(loss) / sum(mini_steps) over plausible records whose loss is near the median's
    alive_peers: int  # plausible records
    samples_per_second: float  # sum over records, each at most SAMPLES_FACTOR x the lower median
    samples: int  # sum of samples_accumulated over records (each capped when target_batch_size is known)
    rejected_records: int  # records that failed signature or schema validation so far (cumulative)
    implausible_records: int = 0  # distinct (peer, epoch) records whose epoch was implausible (cumulative)


LOSS_FACTOR = 4.0  # a record's loss per step further than this factor from the lower median's is left out


def split_plausible(records: list[dict], max_epoch: float = math.inf) -> tuple[list[dict], list[dict]]:
    """(plausible, implausible) records: an epoch above `max_epoch` (what time allows since the last
    accepted epoch) or more than MAX_LEAD beyond the majority's is implausible."""
    timely = [r for r in records if r["epoch"] <= max_epoch]
    if not timely:
        return [], list(records)
    lead = majority_epoch([r["epoch"] for r in timely]) + MAX_LEAD
    plausible = [r for r in timely if r["epoch"] <= lead]
    return plausible, [r for r in records if r["epoch"] > max_epoch or r["epoch"] > lead]


def robust_loss(records: list[dict]) -> float | None:
    """sum(loss) / sum(mini_steps) over records whose loss per step is finite, not negative and within
    LOSS_FACTOR of the lower median of those: one absurd record (1e30, NaN) among two moves nothing."""
    means = [(r, mean) for r in records if (mean := plausible_mean_loss(r)) is not None]
    if not means:
        return None
    reference = lower_median([mean for _, mean in means])
    kept = [r for r, mean in means if reference / LOSS_FACTOR <= mean <= reference * LOSS_FACTOR]
    return sum(r["loss"] for r in kept) / sum(r["mini_steps"] for r in kept)


def capped_sum(values: list[float], cap: float = math.inf, relative: bool = True) -> float:
    """The sum of `values`, each at most `cap` and (`relative`) at most SAMPLES_FACTOR x the lower median of
    the values above 0 (a peer that just started reports 0): a liar adds at most that much to the sum."""
    positive = [v for v in values if v > 0]
    if relative and positive:
        cap = min(cap, SAMPLES_FACTOR * lower_median(positive))
    return sum(min(v, cap) for v in values)


def summarize_records(records: list[dict], rejected_records: int, implausible_records: int = 0,
                      target_batch_size: int | None = None) -> SwarmSnapshot | None:
    """Robust sums of plausible metrics records (dicts that passed the DHT's strict schema check).

    With `target_batch_size`, a record's samples_accumulated counts at most 2 x target_batch_size per epoch
    the swarm is at: no peer contributes more samples than the whole swarm processed.
    """
    if not records:
        return None
    epoch = majority_epoch([r["epoch"] for r in records])
    samples_cap = math.inf if target_batch_size is None else 2 * target_batch_size * (epoch + 1)
    return SwarmSnapshot(
        epoch=epoch,
        loss=robust_loss(records),
        alive_peers=len(records),
        samples_per_second=float(capped_sum([r["samples_per_second"] for r in records])),
        samples=int(capped_sum([r["samples_accumulated"] for r in records], samples_cap, relative=False)),
        rejected_records=rejected_records,
        implausible_records=implausible_records,
    )


class SwarmMonitor:
    """Reads the swarm's metrics at each `refresh()`; prints a line and logs swarm/* to TensorBoard.

    The TensorBoard step is the swarm epoch of the snapshots (the majority's, never one record's; the
    highest this monitor has accepted, so it never goes back when the most advanced peers leave), and a point is written at every refresh whose
    snapshot differs from the last one written. Why the epoch: the default STEP axis then reads as
    loss per collaborative epoch, the same axis as the trainers' own `collab/epoch` logs, and it
    continues where it was when the auxiliary peer restarts into the same logdir (a refresh counter
    would start again at 0 and draw over the old curve). Peers joining or leaving within an epoch
    give several points on one step: TensorBoard's WALL or RELATIVE horizontal axis shows them in
    time order, which is where alive peers over time are read. When no valid record is left, one
    point with alive_peers 0 and samples_per_second 0 is written (at the last step), so a swarm
    that emptied shows it.
    """

    def __init__(self, dht, run_id: str, logdir: str | None, target_batch_size: int | None = None):
        self.dht, self.run_id, self.target_batch_size = dht, run_id, target_batch_size
        self._key_id = metrics_key_id(run_id)
        if self._rejected() is None:
            raise ValueError(f"SwarmMonitor: the DHT was started without monitor_validators({run_id!r}); start it "
                             f"with record_validators=monitor_validators({run_id!r}) so that rejected records are "
                             "counted")
        self._writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=logdir)
        self._step = 0
        self._last_logged: SwarmSnapshot | None = None
        self._last_line: str | None = None
        self.clock = EpochClock()
        self._implausible: set[tuple[bytes, int]] = set()  # (peer's public key, epoch) judged implausible

    def _rejected(self) -> int | None:
        return self.dht.run_coroutine(partial(_rejected_in_dht, key_id=self._key_id))

    def epoch_bound(self) -> float:
        """The highest swarm epoch plausible now (infinite before any record was accepted)."""
        return self.clock.bound(time.monotonic())

    def refresh(self) -> SwarmSnapshot | None:
        """Read every peer's record, print and log what changed; None when no plausible record exists."""
        found = read_metrics(self.dht, self.run_id)
        rejected = self._rejected()
        now = time.monotonic()
        plausible, implausible = split_plausible(list(found.values()), self.clock.bound(now))
        keys = {id(record): key for key, record in found.items()}
        for record in implausible:
            if len(self._implausible) < REMEMBERED_REJECTIONS:
                self._implausible.add((keys[id(record)], record["epoch"]))
        snapshot = summarize_records(plausible, rejected, len(self._implausible), self.target_batch_size)
        if snapshot is not None:
            self.clock.accept(snapshot.epoch, now)
        self._print(snapshot, rejected)
        if self._writer is not None:
            self._log(snapshot, rejected)
        return snapshot

    def _print(self, snapshot: SwarmSnapshot | None, rejected: int) -> None:
        if snapshot is None:
            line = f"[convmodel] swarm '{self.run_id}': no alive peer (no valid metrics record)"
        else:
            loss = "n/a" if snapshot.loss is None else f"{snapshot.loss:.4f}"
            peers = "peer" if snapshot.alive_peers == 1 else "peers"
            line = (f"[convmodel] swarm '{self.run_id}': epoch {snapshot.epoch}, {snapshot.alive_peers} {peers}, "
                    f"loss {loss}, {snapshot.samples_per_second:.1f} samples/s")
        if rejected:
            line += f", {rejected} rejected record{'' if rejected == 1 else 's'}"
        if self._implausible:
            count = len(self._implausible)
            line += f", {count} implausible record{'' if count == 1 else 's'}"
        if line != self._last_line:  # refreshes that change nothing visible print nothing
            print(line, flush=True)
            self._last_line = line

    def _log(self, snapshot: SwarmSnapshot | None, rejected: int) -> None:
        if snapshot is None:
            if self._last_logged is None:
                return  # nothing was ever seen: no curve to end
            snapshot = dataclasses.replace(self._last_logged, loss=None, alive_peers=0, samples_per_second=0.0,
                                           samples=0, rejected_records=rejected,
                                           implausible_records=len(self._implausible))
        if snapshot == self._last_logged:
            return
        self._step = max(self._step, snapshot.epoch)
        scalars = {
            "swarm/epoch": snapshot.epoch,
            "swarm/loss": snapshot.loss,
            "swarm/alive_peers": snapshot.alive_peers,
            "swarm/samples_per_second": snapshot.samples_per_second,
            "swarm/samples": snapshot.samples,
            "swarm/rejected_records": snapshot.rejected_records,
            "swarm/implausible_records": snapshot.implausible_records,
        }
        for tag, value in scalars.items():
            if value is not None:
                self._writer.add_scalar(tag, value, global_step=self._step)
        self._writer.flush()  # a user watching TensorBoard sees each point now, not in two minutes
        self._last_logged = snapshot

    def close(self) -> None:
        """Flush and close the event file (the DHT is the caller's to shut down)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
