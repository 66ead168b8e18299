"""A trainer's checkpoint says which run it belongs to, and a resumed peer does not take a live swarm over.

hivemind serves the state of the peer with the highest epoch to everyone who is behind. A peer that
resumes from a checkpoint further along than the swarm it joins (an old run's checkpoint, another
run's, or a swarm that restarted from an earlier stored state) would replace the training of every
peer with its own at the next download. So a checkpoint records the run_id and collaborative epoch
it was saved at; resuming into another run_id is refused, and resuming ahead of the live peers
needs `resume_ahead_of_swarm: true`, which says that taking the swarm over is meant.
"""

from convmodel.collaborative.swarm_options import OPTION
from convmodel.errors import UserError

CHECKPOINT_KEY = "collaborative"  # under checkpoint["convmodel"], as the auxiliary peer's stored checkpoints have it


def record_run(checkpoint: dict, run_id: str, epoch: int) -> None:
    """Write the run identity into a checkpoint being saved (beside the module's own convmodel section)."""
    checkpoint.setdefault("convmodel", {})[CHECKPOINT_KEY] = {"run_id": run_id, "epoch": int(epoch)}


def check_checkpoint_run(checkpoint: dict, run_id: str) -> None:
    """A checkpoint of another run is refused (one saved before runs were recorded passes)."""
    saved = checkpoint.get("convmodel", {}).get(CHECKPOINT_KEY, {}).get("run_id")
    if saved is not None and saved != run_id:
        raise UserError(f"--ckpt_path: the checkpoint was saved in run {saved!r}, but {OPTION}.run_id is {run_id!r}; "
                        f"resume it with run_id {saved!r}, or start this run without --ckpt_path")


def epochs_of_other_peers(opt) -> list[int]:
    """The collaborative epochs that the other live peers report in hivemind's progress records."""
    found = opt.dht.get(opt.tracker.training_progress_key, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    own = opt.dht.peer_id.to_bytes()
    epochs = []
    for entry in found.value.values():
        progress = getattr(entry, "value", None)
        if isinstance(progress, dict) and progress.get("peer_id") != own and isinstance(progress.get("epoch"), int):
            epochs.append(progress["epoch"])
    return epochs


def refuse_resume_ahead(epoch: int, others: list[int], run_id: str) -> None:
    """A peer whose resumed epoch is past every live peer's stops with one error naming both epochs."""
    if others and epoch > max(others):
        peers = "peer" if len(others) == 1 else "peers"
        raise UserError(
            f"{OPTION}: this peer resumed run {run_id!r} at collaborative epoch {epoch}, but the live swarm "
            f"({len(others)} {peers}) is at epoch {max(others)}: the others would download this checkpoint and "
            f"drop their training since then. Start without --ckpt_path to join the swarm's state, or set "
            f"{OPTION}.resume_ahead_of_swarm: true to make the swarm continue from this checkpoint")
