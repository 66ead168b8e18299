"""One peer of a hivemind swarm, without Lightning: the DHT, hivemind.Optimizer, joining, stepping, leaving.

The trainer's HivemindStrategy and the auxiliary peer each hold one. A training peer:

    peer = SwarmPeer(options)
    peer.join(module_optimizer, scheduler, clip_val, clip_algorithm)   # DHT + hivemind.Optimizer
    peer.catch_up()              # download the swarm's state if it is ahead; metrics record from now on
    for each local batch: backward, then peer.step(samples)  # a collaborative epoch when the swarm is ready
    peer.leave()

Each local step adds its samples to the swarm's count; when the peers together reach
`target_batch_size` they average gradients, take one optimizer step (a *collaborative epoch*)
and step the schedule once.
"""

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch

from convmodel.collaborative.exit_noise import ignore_pending_tasks_destroyed_after_leaving
from convmodel.collaborative.nan_guard import NanGuard, grads_finite, params_finite, wait_for_delayed_updates
from convmodel.collaborative.optimizer_rebuild import rebuild_optimizer, rebuild_scheduler, sync_scheduler
from convmodel.collaborative.run_identity import epochs_of_other_peers, refuse_resume_ahead
from convmodel.collaborative.signals import shielded_children
from convmodel.collaborative.state_check import describe_state
from convmodel.collaborative.swarm_options import OPTION, SwarmOptions
from convmodel.errors import UserError
from convmodel.health import StatusFile, status_path


class SwarmPeer:
    """The swarm session of one process: `dht` and `optimizer` (a hivemind.Optimizer) once joined."""

    def __init__(self, options: SwarmOptions):
        self.options = options
        self.dht = None
        self.optimizer = None
        self.peer_addresses: list[str] = []
        self.guard = NanGuard(options.backup_every_epochs, options.reuse_grad_buffers)
        self.report = None  # EpochReport, once joined
        #: SwarmLossScaler under precision 16-mixed (loss_scaling.py), set by the strategy before joining
        self.loss_scaler = None
        #: hivemind processes on this peer's DHT besides the optimizer's averagers (the auxiliary peer's own
        #: state averager): stopped with them when the peer stops at once
        self.companions: list = []
        self._signer = None
        self.resumed = False  # a checkpoint's optimizer state was loaded (its epoch is checked at catch_up)
        self.status = None  # StatusFile, once caught up (convmodel/health.py: a container's health check)

    @property
    def signer(self):
        """The RSA signature validator this peer signs its metrics record with (once the DHT started)."""
        return self._signer

    # ---- joining ------------------------------------------------------------------------------

    def start_dht(self, extra_validators: list = ()) -> None:
        """Check the options and start the DHT (prints the join address, writes peers_file).

        Alone, for a peer that holds no hivemind.Optimizer (the auxiliary peer that only stores
        checkpoints); `join` calls it first. `extra_validators` are added to the DHT's record
        validators (the monitor counts rejections).
        """
        from convmodel.collaborative.access.policy import access_policy
        from convmodel.collaborative.dht import announce_addresses, metrics_key, start_dht
        from convmodel.collaborative.exit_noise import ignore_closed_loop_in_mpfuture_del
        from convmodel.collaborative.metrics import metrics_validators

        ignore_closed_loop_in_mpfuture_del()

        options = self.options
        addresses = options.check()
        validators, self._signer = metrics_validators(options.run_id, metrics_key(options.identity_path))
        self.dht = start_dht(
            addresses.initial_peers, addresses.host_maddrs, addresses.announce_maddrs, options.identity_path,
            options.client_mode, options.use_ipfs, options.use_relay, options.use_auto_relay, options.nat_port_map,
            options.auto_nat, options.bootstrap_timeout, record_validators=[*validators, *extra_validators],
            access_policy=access_policy(options, OPTION))
        if options.client_mode:
            print(f"[convmodel] peer {self.dht.peer_id} joined in client mode (it cannot be an initial peer)",
                  flush=True)
        else:
            self.peer_addresses = announce_addresses(self.dht, options.peers_file)

    def join(self, module_optimizer: torch.optim.Optimizer, scheduler=None, clip_val: float | None = None,
             clip_algorithm: str = "norm", auxiliary: bool = False, extra_validators: list = (), module=None):
        """Check the options, start the DHT and build the hivemind.Optimizer; returns the optimizer.

        `auxiliary=True`: the auxiliary peer that helps average (hivemind's auxiliary mode).
        `module`: the model being trained; a downloaded state is checked against its schema and a refused one
        names its parameters (state_check.py).
        """
        from convmodel.collaborative.averaging_failures import (
            AveragingFailureCounter,
            quiet_cancelled_round_errors,
        )
        from convmodel.collaborative.epoch_report import EpochReport

        self.options.check()
        if auxiliary and self.options.client_mode:
            raise UserError(f"{OPTION}.client_mode: an auxiliary peer that assists in averaging must accept "
                            "connections; set client_mode: false (or do not assist in averaging)")
        self.start_dht(list(extra_validators))
        quiet_cancelled_round_errors()
        self.report = EpochReport(self.options.run_id, self.options.target_batch_size,
                                  AveragingFailureCounter(on_failure=self._check_peers).attach())
        self.optimizer = self._make_optimizer(module_optimizer, scheduler, clip_val, clip_algorithm, auxiliary)
        if module is not None:
            describe_state(self.optimizer.state_averager, module, module_optimizer)
        return self.optimizer

    def _check_peers(self) -> None:
        """After a failed averaging round: ping the other peers, stop counting the dead (liveness.py)."""
        tracker = getattr(self.optimizer, "tracker", None)
        if tracker is not None and hasattr(tracker, "check_peers"):
            tracker.check_peers()

    def _make_optimizer(self, module_optimizer, scheduler, clip_val, clip_algorithm: str, auxiliary: bool):
        from convmodel.collaborative.compression import build_compression
        from convmodel.collaborative.swarm_optimizer import (
            sample_weighted_averager_class,
            swarm_optimizer_class,
        )

        options = self.options
        optimizer_factory, param_groups = rebuild_optimizer(module_optimizer, clip_val, clip_algorithm)
        averager_opts: dict[str, Any] = {"request_timeout": options.request_timeout}
        if options.bandwidth is not None:
            averager_opts["bandwidth"] = options.bandwidth

        def grad_averager_factory(**kwargs):
            return sample_weighted_averager_class()(**kwargs, **averager_opts)

        # hivemind steps a fresh schedule to the current epoch before the first optimizer step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        with shielded_children():  # its averager processes ignore terminal signals and die with us (signals.py)
            return swarm_optimizer_class()(
                dht=self.dht,
                run_id=options.run_id,
                target_batch_size=options.target_batch_size,
                optimizer=optimizer_factory,
                params=param_groups,
                scheduler=rebuild_scheduler(scheduler),
                matchmaking_time=options.matchmaking_time,
                averaging_timeout=options.averaging_timeout,
                load_state_timeout=options.load_state_timeout,
                next_chunk_timeout=options.next_chunk_timeout,
                reuse_grad_buffers=options.reuse_grad_buffers,
                offload_optimizer=options.offload_optimizer,
                delay_optimizer_step=options.delay_optimizer_step,
                delay_grad_averaging=options.delay_grad_averaging,
                delay_state_averaging=options.delay_state_averaging,
                average_state_every=options.average_state_every,
                client_mode=options.client_mode,
                auxiliary=auxiliary,
                grad_compression=build_compression(options.grad_compression, "grad_compression"),
                state_averaging_compression=build_compression(options.state_averaging_compression,
                                                              "state_averaging_compression"),
                grad_averager_factory=grad_averager_factory,
                tracker_opts={"metadata_expiration": options.metadata_expiration},
                averager_opts=averager_opts,
                verbose=options.verbose,
            )

    def catch_up(self) -> None:
        """Before the first step: take the swarm's state if a peer is further ahead, then report from here."""
        opt = self.optimizer
        before = opt.local_epoch
        if self.resumed and not self.options.resume_ahead_of_swarm:
            refuse_resume_ahead(before, epochs_of_other_peers(opt), self.options.run_id)
        opt.load_state_from_peers()  # keeps ours if the swarm is behind (a resumed peer that is ahead)
        if opt.refused_download:  # another model or optimizer under this run_id: nothing to train with
            raise UserError(f"{OPTION}: cannot join run {self.options.run_id!r}: {opt.refused_download}")
        sync_scheduler(opt)
        run_id = self.options.run_id
        if opt.local_epoch != before:
            print(f"[convmodel] joined run {run_id!r} at collaborative epoch {opt.local_epoch}: "
                  "downloaded the swarm's parameters and optimizer state", flush=True)
        else:
            print(f"[convmodel] training run {run_id!r} from collaborative epoch {opt.local_epoch} "
                  "(no peer further ahead)", flush=True)
        self.guard.take_backup(opt)
        self.report.start(opt, self.dht, self._signer, self.options.metadata_expiration)
        self.status = StatusFile(status_path(self.options.status_file), "trainer", run_id)
        self._write_status(at_once=True)

    def after_checkpoint_load(self) -> None:
        """A checkpoint's optimizer state carries local_epoch: the schedule must follow it."""
        if self.optimizer is not None:
            self.resumed = True
            sync_scheduler(self.optimizer)

    # ---- stepping ------------------------------------------------------------------------------

    def unscale_gradients(self) -> bool:
        """Under a loss scaler, right after backward: unscale this step's gradients; True when fp16 overflowed.

        Without one, nothing to do (False). The result goes to `step` as its `overflow`.
        """
        return self.loss_scaler is not None and self.loss_scaler.overflowed(self.optimizer)

    def step(self, samples: int, loss_finite: bool = True, overflow: bool | None = None) -> bool:
        """This local step's gradients (in the parameters' .grad) count toward the swarm's next epoch.

        Non-finite loss or gradients skip the step (a NaN event, nan_guard.py). Under a loss scaler,
        `overflow` (from `unscale_gradients`, called here when None) with a finite loss skips it as fp16's
        ordinary overflow: the scale falls, nothing is counted as a NaN event and no backup is restored.
        Returns True once the swarm has reached max_collaborative_epochs (with the last step's delayed
        updates applied).
        """
        opt, scaler = self.optimizer, self.loss_scaler
        if overflow is None:
            overflow = self.unscale_gradients()
        if not loss_finite or (not overflow and not grads_finite(opt)):
            self.guard.skip_step(opt)
            if not params_finite(opt):
                self.guard.restore(opt)
        elif overflow:
            scaler.drop(opt)
        else:
            opt.step(batch_size=max(samples, 1), **(scaler.step_arguments() if scaler is not None else {}))
            self.report.samples_contributed += samples
        if scaler is not None:
            scaler.update(overflowed=overflow and loss_finite)
        if not self.report.new_epoch(opt):
            self._write_status(at_once=False)
            return False
        self.guard.after_epoch(opt)
        self.report.publish(opt)
        self._write_status(at_once=True)
        last = self.options.max_collaborative_epochs
        if last is None or opt.local_epoch < last:
            return False
        self.finish_delayed_updates()
        return True

    def finish_delayed_updates(self) -> None:
        """Wait for the background optimizer step and averaging round and apply them to the parameters.

        With delay_optimizer_step the last collaborative step would otherwise land after the
        trainer's final checkpoint, or never: the saved state would be one step behind the swarm.
        """
        if self.optimizer is not None:
            wait_for_delayed_updates(self.optimizer)

    def _write_status(self, at_once: bool, joined: bool = True) -> None:
        """The status file: at once when joining, leaving and at each collaborative epoch, else every few seconds."""
        opt, status = self.optimizer, self.status
        if status is None or status.path is None or opt is None:
            return  # most runs write no status file: nothing is built on each local step then
        values = {"joined": joined, "epoch": opt.local_epoch, "peers": max(opt.tracker.global_progress.num_peers, 1),
                  "peer_id": str(self.dht.peer_id) if self.dht is not None else None}
        if at_once:
            status.write(**values)
        else:
            status.write_due(**values)

    def metrics(self) -> dict[str, float]:
        """The collab/* scalars for this local step."""
        values = self.report.values(self.optimizer, self.guard.skipped_steps)
        if self.loss_scaler is not None:
            values["collab/loss_scale"] = self.loss_scaler.scale
            values["collab/fp16_overflows"] = float(self.loss_scaler.overflows)
        return values

    # ---- leaving -----------------------------------------------------------------------------------

    def leave(self, first: Callable[[], None] | None = None) -> bool:
        """Say goodbye and shut the averagers, the metrics record and the DHT down (safe to call twice).

        The goodbye runs in a thread that the caller waits for at most `goodbye_limit_s`: hivemind's
        shutdown waits for the delayed updates without a timeout, and a lock left held by an interrupted
        hivemind call would make it wait forever. Past the limit, or on a second Ctrl-C
        (KeyboardInterrupt) while waiting, the processes are stopped at once (`stop_at_once`).
        `first` runs at the start of that thread, under the same bound (the auxiliary peer ends its
        assisting thread and its own state averager there). Returns True when a Ctrl-C cut it short.
        """
        import threading

        self._write_status(at_once=True, joined=False)  # unhealthy from here: it is leaving
        self.status = None
        opt, dht, report = self.optimizer, self.dht, self.report
        self.optimizer = self.dht = self.report = None
        if opt is None and dht is None:
            return False
        done = threading.Event()

        def goodbye():
            try:
                if first is not None:
                    first()
                if opt is not None:
                    opt.shutdown()
            except Exception as exc:  # a failed goodbye must not hide the run's own outcome
                print(f"[convmodel] goodbye: {exc!r}", file=sys.stderr)
            if report is not None:
                report.close()
            if dht is not None:
                dht.shutdown()
            done.set()

        thread = threading.Thread(target=goodbye, name="convmodel-goodbye", daemon=True)
        thread.start()
        interrupted = False
        try:  # the line inside: a Ctrl-C once it is printed lands in the wait below
            print(f"[convmodel] saying goodbye to the swarm (at most {self.goodbye_limit_s:g} s; Ctrl-C stops at once)",
                  file=sys.stderr, flush=True)
            finished = done.wait(self.goodbye_limit_s)
        except KeyboardInterrupt:
            finished = interrupted = True
            print("[convmodel] stopping at once (the other peers drop this one when its report expires)",
                  file=sys.stderr, flush=True)
            _stop_processes(opt, dht, self.companions)
        if not finished:
            print(f"[convmodel] the goodbye did not finish within {self.goodbye_limit_s:g} s: stopping at once",
                  file=sys.stderr, flush=True)
            _stop_processes(opt, dht, self.companions)
        ignore_pending_tasks_destroyed_after_leaving()
        return interrupted

    @property
    def goodbye_limit_s(self) -> float:
        """Longest wait for a clean leave: one averaging round to finish and hivemind's own timeouts (3 s each)."""
        return self.options.averaging_timeout + 15.0

    def stop_at_once(self) -> None:
        """Leave without a goodbye (after a second Ctrl-C): end hivemind's processes, wait for nothing."""
        self._write_status(at_once=True, joined=False)
        self.status = None
        opt, dht = self.optimizer, self.dht
        self.optimizer = self.dht = None
        report, self.report = self.report, None
        if report is not None:
            report.close()
        _stop_processes(opt, dht, self.companions)


def _stop_processes(opt, dht, companions: list) -> None:
    """SIGKILL to the averager and DHT processes (they ignore SIGTERM, signals.py; the DHT's p2pd daemon
    follows it, dht.py); a short join each."""
    processes = list(companions)
    if opt is not None:
        processes += [getattr(opt, "state_averager", None), getattr(opt, "grad_averager", None)]
    processes.append(dht)
    for process in processes:
        if process is not None and process.is_alive():
            process.kill()
    for process in processes:
        if process is not None:
            process.join(5)
