"""Each production swarm option switched on alone: two SwarmPeers train a tiny regression together.

The production config turns on every hivemind option at once; when its two-peer test fails, it
cannot say which one broke. Here each option (with only the options it needs) runs on its own,
with no Lightning: two peers on 127.0.0.1, each in a worker process of its own (started once for the
module), stepping a 256x256 linear layer on its own batches for LAST_EPOCH collaborative epochs.
Every case checks what a user relies on: from epoch 2 on each collaborative epoch comes and changes
the parameters, the peers hold equal parameters after the last state round (within the
compression's error), the loss on held-out data falls, and hivemind printed no ERROR or traceback
in those epochs (the peers' output, their averager processes' included, is read from their files).
"""

import gc
import hashlib
import logging
import multiprocessing
import re
import sys
import time

import pytest
import torch

pytest.importorskip("hivemind")

from test_collaborative_swarm_peer import LOOPBACK  # noqa: E402

from convmodel.collaborative.compression import SIZE_ADAPTIVE_THRESHOLD  # noqa: E402
from convmodel.collaborative.swarm_options import SwarmOptions  # noqa: E402
from convmodel.collaborative.swarm_peer import SwarmPeer  # noqa: E402

WIDTH = 256  # the weight has 65536 elements: size-adaptive's 8-bit branch, 8-bit moments under lamb8bit
BATCH, TARGET = 16, 64  # two local steps of each peer per collaborative epoch
CHECKED_FROM, LAST_EPOCH = 2, 10  # 8 epochs checked, two state rounds with average_state_every: 5
CLIP = 0.05  # far below this task's gradient norm (about 1 at the start), so every step is clipped
# the options at SwarmOptions' defaults, except delay_state_averaging (on by default, as in hivemind): it is
# one of the options under test
BASE = {"delay_state_averaging": False}
OPTIONS = {
    "offload_optimizer": {"offload_optimizer": True},
    "delay_optimizer_step": {"offload_optimizer": True, "delay_optimizer_step": True, "delay_state_averaging": True},
    "delay_state_averaging": {"delay_state_averaging": True, "average_state_every": 5},
    # not delay_grad_averaging: alone it failed here in 2 of 2 runs (the peers fell an epoch apart again and
    # again, 3 state downloads in 10 epochs), hivemind's off-by-one gradient groups (README: "Known problem");
    # the shipped configs keep it off
    "size_adaptive_compression": {"grad_compression": "size-adaptive", "state_averaging_compression": "size-adaptive"},
    "lamb8bit": {},
    "clipping": {},
}


class NormRecordingAdamW(torch.optim.AdamW):
    """AdamW that records the norm of the gradient each of its steps receives (after the swarm's clipping)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.norms: list[float] = []

    def step(self, closure=None):
        grads = [p.grad.reshape(-1) for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = float(torch.cat(grads).norm()) if grads else 0.0
        if norm > 0:  # not hivemind's initial zero-gradient step
            self.norms.append(norm)
        return super().step(closure)


def make_optimizer(case: str, params) -> torch.optim.Optimizer:
    if case == "lamb8bit":
        from convmodel.lamb8bit import Lamb8bit

        return Lamb8bit(params, lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    return NormRecordingAdamW(params, lr=0.01, weight_decay=0.0)


class Teacher:
    """y = x W^T + b for a fixed random W, b: a task a linear layer learns in a few steps (also tests/test_diloco.py's)."""

    def __init__(self, width: int = WIDTH, batch_size: int = BATCH):
        generator = torch.Generator().manual_seed(1234)
        self.width, self.batch_size = width, batch_size
        self.weight = torch.randn(width, width, generator=generator) / width**0.5
        self.bias = torch.randn(width, generator=generator) * 0.5
        self.held_out = self.batch(torch.Generator().manual_seed(99), 256)

    def batch(self, generator: torch.Generator, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size or self.batch_size, self.width, generator=generator)
        return x, x @ self.weight.T + self.bias

    def loss(self, model: torch.nn.Module) -> float:
        with torch.no_grad():
            x, y = self.held_out
            return float(torch.nn.functional.mse_loss(model(x), y))


def fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    return digest.hexdigest()


class ErrorRecords(logging.Handler):
    """hivemind's ERROR records and records with a traceback, in this process."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(f"{record.name}: {record.getMessage()}")


def wait_for_the_other_peer(tracker) -> None:
    """After this peer's first local step (a peer tells the DHT its progress once it has samples): wait until
    its tracker counts both peers. Local steps take a millisecond here; a peer that went on before it counted
    the other would run its epochs alone (hivemind skips averaging while it counts one peer)."""
    deadline = time.monotonic() + 60
    while tracker.global_progress.num_peers < 2:
        assert time.monotonic() < deadline, "the peers never saw each other in the DHT"
        time.sleep(0.05)


def wait_for_a_progress_fetch(tracker) -> None:
    """Wait until the tracker has read the swarm's progress in this epoch, as it has many times over in an
    epoch of a real swarm (minutes long, against a fetch every second or so).

    hivemind checks that a peer is in the swarm's epoch exactly only once it has fetched the progress in
    that epoch; before, a peer one epoch behind passes as "just transitioning". Here an epoch lasts about
    the 0.5 s of matchmaking, so without this wait that check almost never ran: on a loaded machine the
    joiner, left one epoch behind by the start's lone epoch, stayed there, its gradient rounds paired with
    the other peer's rounds of the next epoch, and each state round (one peer at epoch 5 or 10, the other
    in a gradient round) found no group; the peers ended 0.09 apart (2 runs in 30). With the fetch, the
    lagging peer sees the epoch ahead and downloads the state at its next step.
    """
    assert tracker.fetched_global_progress_this_epoch.wait(30), "the tracker fetched no progress in 30 s"


def train_case(case: str, data_seed: int, initial_peers: list[str] | None, results,
               errors: "ErrorRecords") -> tuple[SwarmPeer, dict]:
    """Join the case's swarm (the first peer puts its addresses in `results`), train to LAST_EPOCH; the peer
    (still in the swarm) and what the test checks: the parameters' fingerprint at each epoch from CHECKED_FROM.

    The first epoch goes to whoever steps first: the first peer's progress record has an ETA long past when
    the joiner steps, and the joiner does not count itself yet, so it takes that epoch alone (hivemind skips
    averaging) and the first peer downloads its state to catch up. From epoch 2 on they train together.
    """
    teacher, peer = Teacher(), None
    torch.manual_seed(0)  # the same initial weights on both peers
    model = torch.nn.Linear(WIDTH, WIDTH)
    peer = SwarmPeer(SwarmOptions(run_id=f"alone_{case}", target_batch_size=TARGET, max_collaborative_epochs=LAST_EPOCH,
                                  initial_peers=initial_peers, **{**LOOPBACK, **BASE, **OPTIONS[case]}))
    peer.join(make_optimizer(case, model.parameters()), clip_val=CLIP if case == "clipping" else None)
    if initial_peers is None:
        results.put({"addresses": peer.peer_addresses})
    peer.catch_up()
    opt, generator, epochs = peer.optimizer, torch.Generator().manual_seed(data_seed), []
    loss_before, seen_epoch = teacher.loss(model), opt.local_epoch
    for step in range(2000):  # about 4 local steps per epoch; far more than LAST_EPOCH needs
        if opt.local_epoch >= CHECKED_FROM and (not epochs or epochs[-1][0] != opt.local_epoch):
            if not epochs:
                errors.records.clear()  # checked from here, as the epochs are
            peer.finish_delayed_updates()  # the delayed step (and state round) of the epoch that just ended lands
            epochs.append((opt.local_epoch, fingerprint(model)))
        if opt.local_epoch != seen_epoch:
            wait_for_a_progress_fetch(opt.tracker)
            seen_epoch = opt.local_epoch
        x, y = teacher.batch(generator)
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x), y).backward()
        if peer.step(BATCH):
            break
        if step == 0:
            wait_for_the_other_peer(opt.tracker)
    epochs.append((opt.local_epoch, fingerprint(model)))
    return peer, {"epochs": epochs, "loss_before": loss_before, "loss_after": teacher.loss(model),
                  "norms": list(getattr(opt.opt, "norms", [])),
                  "params": {name: p.detach().numpy().copy() for name, p in model.named_parameters()}}


def swarm_worker(data_seed: int, tasks, results, logdir: str) -> None:
    """A process that runs one peer of each case it is sent; its output (and its averagers') goes to
    `<logdir>/<case>-<data_seed>.log`. After its result it stays in the swarm until told to leave: the
    other peer may still be in the last state round."""
    import os
    import traceback

    os.setsid()  # the test kills the worker, its averagers and p2pd daemon together if it must
    multiprocessing.set_start_method("fork", force=True)  # hivemind's averagers, as in a trainer process
    torch.set_num_threads(1)
    errors = ErrorRecords()
    for name in ("hivemind", "asyncio"):
        logging.getLogger(name).addHandler(errors)
    while (task := tasks.get()) is not None:
        case, initial_peers = task
        sys.stdout.flush(), sys.stderr.flush()
        with open(os.path.join(logdir, f"{case}-{data_seed}.log"), "w") as log:
            os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        errors.records, peer = [], None
        try:
            peer, result = train_case(case, data_seed, initial_peers, results, errors)
        except BaseException:
            result = {"error": traceback.format_exc()}
        results.put({**result, "errors": list(errors.records)})
        tasks.get()  # leave
        if peer is not None:
            peer.leave()
        gc.collect()  # asyncio's "Task was destroyed but it is pending!" of the tasks the peer left, now
        results.put("left")


class SwarmWorkers:
    """Two swarm_worker processes, started once for this module (their imports take 10-15 s each)."""

    def __init__(self, logdir):
        context = multiprocessing.get_context("spawn")  # not forked from pytest, whose hivemind key is taken
        self.logdir = logdir
        self.tasks, self.results = [context.Queue(), context.Queue()], [context.Queue(), context.Queue()]
        self.processes = [context.Process(target=swarm_worker, args=(seed, tasks, results, str(logdir)))
                          for seed, tasks, results in zip((1, 2), self.tasks, self.results)]
        for process in self.processes:
            process.start()

    def run(self, case: str) -> tuple[list[dict], list[str]]:
        """Both peers' results for `case` and their outputs."""
        self.tasks[0].put((case, None))
        joined = self.results[0].get(timeout=120)
        self.tasks[1].put((case, joined.get("addresses", [])))  # [] when the first peer failed to start
        outcomes = [joined if "addresses" not in joined else self.results[0].get(timeout=120),
                    self.results[1].get(timeout=120)]
        for tasks in self.tasks:
            tasks.put("leave")
        for results in self.results:
            assert results.get(timeout=60) == "left"
        return outcomes, [(self.logdir / f"{case}-{seed}.log").read_text() for seed in (1, 2)]

    def close(self) -> None:
        import os
        import signal

        for tasks in self.tasks:
            tasks.put(None)
        for process in self.processes:
            process.join(30)
            try:
                os.killpg(process.pid, signal.SIGKILL)  # what is left of it: averagers, p2pd
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def swarm_workers(tmp_path_factory):
    workers = SwarmWorkers(tmp_path_factory.mktemp("swarm-options"))
    yield workers
    workers.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(OPTIONS))
def test_an_option_alone_trains_two_peers(case, swarm_workers):
    # each peer in its own process: peers in one process share hivemind's process-wide RSA key, so their
    # progress records in the DHT (one subkey per key) overwrite each other and each tracker counts one peer
    outcomes, logs = swarm_workers.run(case)
    output = "\n".join(logs)
    for outcome in outcomes:
        assert outcome.get("error") is None, outcome["error"] + output[-3000:]
    for outcome, log in zip(outcomes, logs):
        # from epoch 2 on, every collaborative epoch came, and changed the parameters
        epochs = [epoch for epoch, _ in outcome["epochs"]]
        assert epochs == list(range(epochs[0], LAST_EPOCH + 1)) and epochs[0] <= CHECKED_FROM + 1, (epochs, log[-3000:])
        unchanged = [b[0] for a, b in zip(outcome["epochs"], outcome["epochs"][1:]) if a[1] == b[1]]
        assert not unchanged, (f"epochs that left the parameters unchanged: {unchanged}", log[-3000:])
        # no traceback through our code or Lightning's and no ERROR but a round that formed no group, in the
        # epochs checked (the start's lone epoch may fail a round; hivemind's pre-scheduled rounds may fail once
        # the peers stop). On a loaded 2-core CI machine a state round of delay_state_averaging overlapped the
        # next round and 2 rounds found no group (the epochs still came and changed the parameters): 2 at most
        training = log.split(f"collaborative epoch {CHECKED_FROM} (")[-1].split(f"collaborative epoch {LAST_EPOCH} (")[0]
        assert not re.search(r'File "[^"]*/(convmodel|pytorch_lightning)/', training), training[-4000:]
        # with delay_state_averaging, each of the two background state rounds (epochs 5 and 10) can fail with the
        # gradient round it overlaps (3 failed rounds in a fresh-clone run, the parameters still changed every
        # epoch and agreed below): 2 per state round there. Those runs had no wait_for_a_progress_fetch: the
        # overlaps were likely the off-by-one epochs it now ends at the next step; the bound stays for a slow machine
        errors = re.findall(r"\[ERROR\].*", training)
        allowed = 4 if case == "delay_state_averaging" else 2
        assert len(errors) <= allowed and all("Averaging step failed: could not find a group" in e for e in errors), \
            training[-4000:]
        assert not outcome["errors"], outcome["errors"]
    # the peers agree after the last state round: within fp16's error (the state is sent in fp16), and within a
    # small part of the tensor's spread where size-adaptive sends 8 bits (256 bins over mean +- 6 sigma)
    for name, mine in outcomes[0]["params"].items():
        mine, theirs = torch.from_numpy(mine), torch.from_numpy(outcomes[1]["params"][name])
        difference = (mine - theirs).abs()
        print(f"{case}: {name} differs by {float(difference.max()):.2e} at most, {float(difference.mean()):.2e} "
              f"on average (values up to {float(mine.abs().max()):.2e})")
        if case == "size_adaptive_compression" and mine.numel() >= SIZE_ADAPTIVE_THRESHOLD:
            assert float(difference.mean()) < 0.05 * float(mine.std()), name
        else:
            assert float(difference.max()) < 2e-3 * float(mine.abs().max()), name
    before, after = outcomes[0]["loss_before"], [outcome["loss_after"] for outcome in outcomes]
    print(f"{case}: held-out loss {before:.4f} -> {after[0]:.4f} / {after[1]:.4f}")
    assert max(after) < 0.8 * before, (before, after)
    if case == "clipping":  # every step received the swarm's averaged gradient clipped to CLIP
        norms = outcomes[0]["norms"]
        assert len(norms) >= LAST_EPOCH - CHECKED_FROM and all(abs(n - CLIP) < 1e-3 * CLIP for n in norms), norms
