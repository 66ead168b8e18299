"""Gradient rounds meet only rounds of the same collaborative epoch.

hivemind 1.1.12 finds the group of an averaging round under one DHT key per averager
(`<prefix>.0b<group bits>`, hivemind/averaging/key_manager.py, GroupKeyManager.current_key), so a
round pairs with whatever round of another peer is looking at that moment, whatever its epoch.
With delay_grad_averaging a peer's round for epoch e is still pending (triggered, looking for or
waiting in its group) after its main thread has moved on, and the other peer pre-schedules its
round for e + 1 about then: once a round is missed (a peer busy with a state round, a joiner
catching up, a round that formed no group) peer A's round e pairs with peer B's round e + 1. A's
next epoch then waits for that round (Optimizer._update_global_epoch first waits for the delayed
update, which waits for the round), B has already pre-scheduled e + 2, and the offset stays: each
round averages gradients of two different epochs, and whenever B triggers more than
next_chunk_timeout after A, A drops B's half ("Reducer: received 50.0% of input tensors").

Keying each round by its epoch (`<prefix>_epoch<e>.0b<bits>`) lets round e meet only round e: a
peer one epoch behind triggers its round e at once (the swarm's epoch is ahead, so it is ready),
into the group of the others' round e, and is in step again.

The epoch travels in the round's gather data (the only per-round value the averager process sees);
the key manager in the averager process reads it from the step being matched.
"""

from typing import Any

EPOCH_KEY_TAG = "_epoch"


def epoch_of_round(serializer, data_for_gather: bytes) -> int | None:
    """The epoch a GradientAverager round was scheduled for, from its gather data (None if it has none)."""
    try:
        _bandwidth, _mode, user_data = serializer.loads(data_for_gather)
        epoch = serializer.loads(user_data)
    except Exception:  # a round scheduled without our gather data
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def key_groups_by_epoch(matchmaking: Any, serializer) -> None:
    """Make `matchmaking` (an averager process's hivemind Matchmaking) look for groups under epoch keys.

    Idempotent. The key manager is replaced by one that reads the epoch of the step being matched:
    the DHT declaration, the leader lookup and the leader's check of a join request all use it, so
    a round of another epoch is never seen, and a join request from one is refused (BAD_GROUP_KEY).
    """
    from hivemind.averaging.key_manager import GroupKeyManager

    manager = matchmaking.group_key_manager
    if getattr(manager, "keyed_by_epoch", False):
        return

    class EpochGroupKeyManager(GroupKeyManager):
        keyed_by_epoch = True

        @property
        def current_key(self) -> str:
            step = matchmaking.step_control  # set while a round looks for its group
            epoch = None if step is None else epoch_of_round(serializer, step.data_for_gather)
            if epoch is None:
                return super().current_key
            return f"{self.prefix}{EPOCH_KEY_TAG}{epoch}.0b{self.group_bits}"

    replacement = EpochGroupKeyManager.__new__(EpochGroupKeyManager)
    replacement.__dict__.update(manager.__dict__)
    matchmaking.group_key_manager = replacement
