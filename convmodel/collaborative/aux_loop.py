"""The auxiliary peer's loop: refresh the monitor, store checkpoints, upload, until SIGINT/SIGTERM.

It holds a SwarmPeer like a trainer, but never trains: without --assist_in_averaging only its
DHT (and, with --store_checkpoints, a state averager to download and serve the swarm's state,
held_state.py); with it, an auxiliary hivemind.Optimizer that joins the averaging rounds. A DiLoCo
run's state is its outer state (diloco_held_state.py); the loop is the same, rounds for epochs.
"""

import math
import os
import signal
import sys
import threading
import time

from convmodel.collaborative.diloco_held_state import DiLoCoHeldState
from convmodel.collaborative.held_state import SwarmState
from convmodel.collaborative.optimizer_rebuild import module_optimizer
from convmodel.collaborative.signals import StopOnSignal
from convmodel.collaborative.swarm_options import SwarmOptions
from convmodel.collaborative.swarm_peer import SwarmPeer
from convmodel.errors import UserError, user_message
from convmodel.health import StatusFile, status_path

EXPORT_FOLDER = "export"  # inside --store_checkpoints: the exported model that --push_to_hub uploads


class AuxiliaryPeer:
    """The loop: refresh the monitor, store checkpoints, upload, until SIGINT/SIGTERM."""

    def __init__(self, module, trainer, datamodule, options, swarm_options: SwarmOptions):
        from convmodel.collaborative.checkpoint_store import CheckpointStore

        self.module, self.trainer, self.datamodule, self.options = module, trainer, datamodule, options
        self.peer = SwarmPeer(swarm_options)
        self.store = (CheckpointStore(options.store_checkpoints, options.keep_checkpoints)
                      if options.store_checkpoints else None)
        self.state: SwarmState | DiLoCoHeldState | None = None
        self.monitor = None
        self.stored_epoch: int | None = None
        self.uploaded_epoch: int | None = None
        self.last_upload = -math.inf
        self.swarm_epoch: int | None = None
        self.swarm_loss: float | None = None
        self.alive_peers = 0
        self._tried_at_epoch: int | None = None
        self.stop = threading.Event()
        self._assist_stop = threading.Event()
        self._assist_thread: threading.Thread | None = None
        self._signals = StopOnSignal((signal.SIGINT, signal.SIGTERM), self._on_signal)
        #: rewritten at each refresh: the container's health check (convmodel/health.py)
        self.status = StatusFile(status_path(swarm_options.status_file), "auxiliary peer", swarm_options.run_id)

    # ---- joining ------------------------------------------------------------------------------

    def join(self) -> None:
        """Start the DHT (printing the join address) and the state averager; load the stored checkpoint."""
        from convmodel.collaborative.monitor import SwarmMonitor, monitor_validators

        peer, options = self.peer, self.options
        self.module.trainer = self.trainer  # configure_optimizers reads trainer.max_steps when total_steps is unset
        optimizer, scheduler = module_optimizer(self.module)
        validators = monitor_validators(peer.options.run_id)
        diloco = peer.options.algorithm == "diloco"
        if diloco:  # the outer state is what the trainers share (diloco_held_state.py); --assist_in_averaging is refused
            peer.start_dht(validators)
            if self.store is not None:
                self.state = DiLoCoHeldState.download_only(peer, self.module)
                peer.companions.append(self.state.averager)
        elif options.assist_in_averaging:
            opt = peer.join(optimizer, scheduler, self.trainer.gradient_clip_val,
                            str(self.trainer.gradient_clip_algorithm or "norm"), auxiliary=True,
                            extra_validators=validators, module=self.module)
            self.state = SwarmState(peer.options, opt.state_averager, opt)
        else:
            peer.start_dht(validators)
            if self.store is not None:
                self.state = SwarmState.download_only(peer, optimizer, scheduler, self.module)
                peer.companions.append(self.state.averager)  # stopped with the DHT when we stop at once
        # a DiLoCo round's samples are the trainers' inner steps: target_batch_size does not bound them
        self.monitor = SwarmMonitor(peer.dht, peer.options.run_id, options.logdir,
                                    None if diloco else peer.options.target_batch_size)
        self._signals.install()  # after the DHT and averagers started: hivemind sets SIGINT to "ignore" first
        self._read_monitor()  # the swarm's epoch, before a stored or downloaded state is judged by it
        if self.store is not None:
            self._load_stored()
        if self.state is not None:
            self._download("joined")
        self._write_status(joined=True)

    def _load_stored(self) -> None:
        from convmodel.collaborative.checkpoint_store import checkpoint_epoch, read_checkpoint

        path = self.store.latest()
        if self.store.removed_temp_files:
            print(f"[convmodel] removed {len(self.store.removed_temp_files)} unfinished checkpoint file(s) from "
                  f"{self.store.directory} (a write was interrupted)", flush=True)
        for passed_over, reason in self.store.passed_over:
            print(f"[convmodel] passed over {passed_over}: {reason}; move it away if it is yours", flush=True)
        if path is None:
            return
        checkpoint = read_checkpoint(path)
        ours = checkpoint.get("convmodel", {}).get("collaborative", {})
        if ours.get("run_id") not in (None, self.peer.options.run_id):
            raise UserError(f"--store_checkpoints {self.store.directory} holds checkpoints of run "
                            f"{ours['run_id']!r}, but the config's run_id is {self.peer.options.run_id!r}; give another "
                            "folder, or set trainer.strategy.init_args.run_id")
        try:
            self.module.on_load_checkpoint(checkpoint)  # one message for another tokenizer or model size
        except UserError as exc:
            raise UserError(f"--store_checkpoints {path}: {exc}") from exc
        epoch, bound = checkpoint_epoch(checkpoint), self.monitor.epoch_bound()
        if epoch > bound:  # stored by an older version from a poisoned state: the swarm's records say otherwise
            print(f"[convmodel] passed over {path}: its collaborative epoch {epoch} is beyond what the swarm's "
                  f"metrics records allow (at most {bound:.0f}); not loaded, the swarm's state is downloaded",
                  flush=True)
            return
        try:
            epoch = self.state.load_checkpoint(checkpoint, self.module)
        except (KeyError, RuntimeError, ValueError) as exc:  # missing/unexpected keys, another optimizer
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"--store_checkpoints {path} does not fit this config's model and optimizer ({detail}); "
                            "give the run's own config, or another folder") from exc
        self.stored_epoch = epoch
        print(f"[convmodel] loaded {path} (collaborative epoch {epoch}); serving it to peers that join",
              flush=True)

    # ---- running ------------------------------------------------------------------------------

    def run(self) -> None:
        """Join, then refresh until asked to stop; the last checkpoint is written before leaving.

        A second signal (KeyboardInterrupt) anywhere, the last download and the goodbye included,
        stops at once: hivemind's processes are ended and nothing more is waited for.
        """
        try:
            self.join()
            if self.options.assist_in_averaging:
                self._assist_thread = threading.Thread(target=self._assist, name="convmodel-assist", daemon=True)
                self._assist_thread.start()
            while not self.stop.is_set():
                self.refresh()
                self.stop.wait(self.options.refresh_period)
            self._final_checkpoint()
        except KeyboardInterrupt:
            self.stop_at_once()
            raise
        except BaseException:
            self.leave()
            raise
        if self.leave():
            raise KeyboardInterrupt  # the goodbye was cut short by a second signal: the same exit as above

    def refresh(self) -> None:
        self._read_monitor()
        if self.store is not None and self._checkpoint_due():
            self._tried_at_epoch = self.swarm_epoch
            if self._download("checkpoint"):
                self._store()
        self._maybe_upload()
        self._write_status(joined=True)

    def _read_monitor(self) -> None:
        """The monitor's robust numbers (never one record's): the swarm epoch the checkpoints follow."""
        snapshot = self.monitor.refresh()
        self.alive_peers = snapshot.alive_peers if snapshot is not None else 0
        if snapshot is not None:
            self.swarm_epoch = max(snapshot.epoch, self.swarm_epoch or 0)
            self.swarm_loss = snapshot.loss

    def _plausible_epoch(self) -> float:
        """The highest epoch a downloaded state may have: what time allows since the swarm epoch the monitor
        last accepted. Before it accepted one (no live metrics record: a trainer publishes one as it
        starts), the held state's epoch plus EPOCH_SLACK: a swarm without records has not moved far."""
        from convmodel.collaborative.plausibility import epochs_allowed

        bound = self.monitor.epoch_bound()
        return bound if math.isfinite(bound) else epochs_allowed(self.state.epoch or 0, 0.0)

    def _checkpoint_due(self) -> bool:
        """The swarm is checkpoint_every epochs past the stored state (and has moved since the last try:
        when no peer could send its state, e.g. all are in client mode, ask again one epoch later)."""
        if self.swarm_epoch is None or self.swarm_epoch == self._tried_at_epoch:
            return False
        return self.swarm_epoch >= (self.stored_epoch or 0) + self.options.checkpoint_every

    def _download(self, why: str) -> bool:
        try:
            newer = self.state.download(self._plausible_epoch())
        except Exception as exc:  # a peer that left mid-download, a timeout: the next refresh tries again
            print(f"[convmodel] could not download the swarm's state ({why}): {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
            return False
        if newer:
            print(f"[convmodel] downloaded the swarm's state at collaborative epoch {self.state.epoch}", flush=True)
        return newer

    def _store(self) -> None:
        state = self.state
        if state.epoch is None or (self.stored_epoch is not None and state.epoch <= self.stored_epoch):
            return
        metrics = {"train/loss": self.swarm_loss} if self.swarm_loss is not None else {}
        checkpoint = state.checkpoint(self.module, self.datamodule, metrics)
        poisoned = first_non_finite(checkpoint["state_dict"])
        if poisoned is not None:  # a NaN swarm state is not worth keeping: the stored one stays latest
            print(f"[convmodel] not storing the swarm's state at collaborative epoch {state.epoch}: its {poisoned} "
                  "holds NaN or infinite values", file=sys.stderr, flush=True)
            return
        path = self.store.write(state.epoch, checkpoint)
        self.stored_epoch = state.epoch
        print(f"[convmodel] stored the swarm's state at collaborative epoch {state.epoch}: {path}", flush=True)

    def _maybe_upload(self) -> None:
        options = self.options
        if options.push_to_hub is None or self.stored_epoch is None or self.stored_epoch == self.uploaded_epoch:
            return
        if time.monotonic() - self.last_upload < options.upload_every:
            return
        from convmodel.export import PushError, export_model

        self.last_upload = time.monotonic()
        epoch = self.stored_epoch
        try:
            export_model(self.store.latest(), os.path.join(self.store.directory, EXPORT_FOLDER),
                         push_to_hub=options.push_to_hub, overwrite=True,
                         commit_message=f"Collaborative epoch {epoch} of run {self.peer.options.run_id}")
        except Exception as exc:  # the swarm goes on; the next interval tries again (a full disk included)
            reason = user_message(exc) or (str(exc) if isinstance(exc, PushError) else f"{type(exc).__name__}: {exc}")
            print(f"[convmodel] upload of collaborative epoch {epoch} failed: {reason}; trying again in "
                  f"{options.upload_every:g} s (--upload_every)", file=sys.stderr, flush=True)
            return
        self.uploaded_epoch = epoch

    def _assist(self) -> None:
        while not self._assist_stop.wait(self.options.assist_every):
            try:
                self.state.assist()
            except Exception as exc:  # a failed round must not end the assistance
                print(f"[convmodel] assisting in averaging: {type(exc).__name__}: {exc}", file=sys.stderr,
                      flush=True)

    def _write_status(self, joined: bool) -> None:
        dht = self.peer.dht
        self.status.write(joined=joined, epoch=self.swarm_epoch, peers=self.alive_peers,
                          peer_id=str(dht.peer_id) if dht is not None else None)

    # ---- leaving -----------------------------------------------------------------------------

    def _on_signal(self, signum) -> bool:
        """SIGINT/SIGTERM: finish what is running, write the last checkpoint, leave (signals.py: twice stops)."""
        self.stop.set()
        print(f"[convmodel] {signal.Signals(signum).name}: writing the last checkpoint and leaving the swarm "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        return True

    def _final_checkpoint(self) -> None:
        if self.store is None:
            return
        if self.alive_peers and self.swarm_epoch is not None and self.swarm_epoch > (self.state.epoch or 0):
            self._download("last checkpoint")
        self._store()

    def leave(self) -> bool:
        """The goodbye, bounded as a trainer's (SwarmPeer.leave); True when a second signal cut it short."""
        joined = self.peer.dht is not None
        if joined:
            self._write_status(joined=False)  # unhealthy from here: it is leaving
        interrupted = self.peer.leave(first=self._end_own_work)
        if not joined:  # nothing ran in a goodbye; after one, what it left running was stopped at once
            self._end_own_work()
        self._signals.restore()
        if joined:
            print(f"[convmodel] auxiliary peer stopped{' at once' if interrupted else ''}", flush=True)
        return interrupted

    def _end_own_work(self) -> None:
        """Stop the assisting thread, close the monitor's log and shut our own state averager down (once)."""
        self._assist_stop.set()
        thread, self._assist_thread = self._assist_thread, None
        if thread is not None:
            thread.join()  # its averaging round ends within averaging_timeout; the goodbye's bound covers it
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()
        state, self.state = self.state, None
        if state is not None:
            state.shutdown()

    def stop_at_once(self) -> None:
        """After a second signal: end hivemind's processes (SwarmPeer.stop_at_once), join nothing."""
        self._assist_stop.set()
        joined = self.peer.dht is not None
        if joined:
            self._write_status(joined=False)
        self.peer.stop_at_once()
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()
        self._signals.restore()
        if joined:
            print("[convmodel] auxiliary peer stopped at once", flush=True)


def first_non_finite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity (None when all are finite)."""
    import torch

    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None
