"""HivemindStrategy: the same LightningModule trains alone or in a hivemind swarm.

Swapping `trainer.strategy` for this class is the whole difference. The strategy starts a
DHT, turns the module's own optimizer and schedule (`configure_optimizers`) into a
`hivemind.Optimizer`, joins the swarm's state before the first step and shuts everything
down in `teardown`. Each local step adds its samples to the swarm's count; when the peers
together reach `target_batch_size` they average gradients, take one optimizer step (a
*collaborative epoch*) and step the schedule once.
"""

import copy
import inspect
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry
from pytorch_lightning.trainer import call
from pytorch_lightning.utilities.data import extract_batch_size
from typing_extensions import override

from convmodel.collaborative.compression import COMPRESSION_NAMES, CompressionName
from convmodel.errors import UserError

OPTION = "trainer.strategy.init_args"


class HivemindStrategy(SingleDeviceStrategy):
    """Train in a hivemind swarm: peers average gradients until they have `target_batch_size` samples.

    Args:
        run_id: Name of the training run; peers with the same run_id train together (no dots).
        target_batch_size: Samples the whole swarm accumulates per optimizer step (collaborative epoch).
        initial_peers: Multiaddrs of running peers to join (a list or one string); default
            $CONVMODEL_INITIAL_PEERS; none starts a new swarm.
        host_maddrs: Multiaddrs this peer listens on (tcp/0 picks a free port).
        announce_maddrs: Multiaddrs other peers should use to reach this one (a public address behind NAT).
        identity_path: Private key file that keeps this peer's id stable across restarts; generated if missing.
        client_mode: Only connect out (for peers that cannot accept connections); does not serve state.
        use_ipfs: Also look for peers through the public IPFS network.
        use_relay: Accept connections relayed through other peers (for peers behind NAT).
        use_auto_relay: Look for relays automatically when behind NAT.
        nat_port_map: Ask the router to open a port (UPnP/NAT-PMP).
        auto_nat: Let other peers tell this one whether it is publicly reachable.
        matchmaking_time: Seconds peers spend forming a group before each averaging round.
        averaging_timeout: Seconds after which an averaging round is given up (local gradients are used).
        load_state_timeout: Seconds to wait for a peer to send the swarm's state when joining.
        next_chunk_timeout: Seconds to wait for each part of a tensor during averaging; default matchmaking_time.
        bootstrap_timeout: Seconds to wait for initial_peers to answer before giving up with an error.
        metadata_expiration: Seconds a peer's progress report stays valid; a killed or disconnected peer is
            counted (and waited for in averaging, up to averaging_timeout per round) until its report expires.
            Live peers renew theirs every metadata_expiration / 2 seconds.
        grad_compression: Gradient compression for averaging: none, fp16, uint8 or size-adaptive
            (fp16 below 65536 elements, uint8 above).
        state_averaging_compression: Compression for averaging parameters and optimizer state (same choices).
        offload_optimizer: Keep the optimizer and its state in CPU memory (saves accelerator memory).
        delay_optimizer_step: Run the optimizer step in the background while the next batches compute
            (needs offload_optimizer).
        delay_grad_averaging: Average gradients in the background too (needs delay_optimizer_step).
        delay_state_averaging: Average parameters in the background instead of stopping for it.
        average_state_every: Average parameters and optimizer state every this many collaborative epochs.
        reuse_grad_buffers: Accumulate gradients in the parameters' .grad buffers (saves memory).
        bandwidth: This peer's bandwidth in Mbit/s, used to share the averaging load fairly; default measured by none.
        max_collaborative_epochs: Stop training when the swarm reaches this collaborative epoch.
        backup_every_epochs: Keep an in-memory copy of parameters and optimizer state every this many
            collaborative epochs, restored when a step gives non-finite parameters (0 turns it off).
        peers_file: Write this peer's addresses here (one a line) once the DHT has started.
        verbose: Log each hivemind step (matchmaking, averaging, epoch changes).
    """

    strategy_name = "hivemind"

    def __init__(
        self,
        run_id: str = "convmodel",
        target_batch_size: int = 4096,
        initial_peers: list[str] | str | None = None,
        host_maddrs: list[str] | None = None,
        announce_maddrs: list[str] | None = None,
        identity_path: str | None = None,
        client_mode: bool = False,
        use_ipfs: bool = False,
        use_relay: bool = True,
        use_auto_relay: bool = False,
        nat_port_map: bool = True,
        auto_nat: bool = True,
        matchmaking_time: float = 5.0,
        averaging_timeout: float = 60.0,
        load_state_timeout: float = 600.0,
        next_chunk_timeout: float | None = None,
        bootstrap_timeout: float = 30.0,
        metadata_expiration: float = 60.0,
        grad_compression: CompressionName = "fp16",
        state_averaging_compression: CompressionName = "fp16",
        offload_optimizer: bool = False,
        delay_optimizer_step: bool = False,
        delay_grad_averaging: bool = False,
        delay_state_averaging: bool = True,
        average_state_every: int = 1,
        reuse_grad_buffers: bool = False,
        bandwidth: float | None = None,
        max_collaborative_epochs: int | None = None,
        backup_every_epochs: int = 10,
        peers_file: str | None = None,
        verbose: bool = False,
    ):
        super().__init__(device="cpu")
        # filled in by Lightning's accelerator connector from trainer.accelerator/devices
        self.parallel_devices: list[torch.device] | None = None
        self._initial_peers_option, self._host_maddrs_option = initial_peers, host_maddrs
        self._announce_maddrs_option = announce_maddrs
        self.initial_peers: list[str] = []
        self.host_maddrs: list[str] = []
        self.announce_maddrs: list[str] | None = None
        self.run_id, self.target_batch_size = run_id, target_batch_size
        self.identity_path, self.client_mode, self.use_ipfs = identity_path, client_mode, use_ipfs
        self.use_relay, self.use_auto_relay = use_relay, use_auto_relay
        self.nat_port_map, self.auto_nat = nat_port_map, auto_nat
        self.matchmaking_time, self.averaging_timeout = matchmaking_time, averaging_timeout
        self.load_state_timeout, self.next_chunk_timeout = load_state_timeout, next_chunk_timeout
        self.bootstrap_timeout, self.metadata_expiration = bootstrap_timeout, metadata_expiration
        self.grad_compression, self.state_averaging_compression = grad_compression, state_averaging_compression
        self.offload_optimizer, self.delay_optimizer_step = offload_optimizer, delay_optimizer_step
        self.delay_grad_averaging, self.delay_state_averaging = delay_grad_averaging, delay_state_averaging
        self.average_state_every, self.reuse_grad_buffers = average_state_every, reuse_grad_buffers
        self.bandwidth, self.max_collaborative_epochs = bandwidth, max_collaborative_epochs
        self.backup_every_epochs, self.peers_file, self.verbose = backup_every_epochs, peers_file, verbose

        self.dht = None
        self.hivemind_optimizer = None
        self.peer_addresses: list[str] = []
        self._samples_since_step = 0
        self._non_finite_loss = False
        self._epoch_seen: int | None = None
        self._epoch_started_at: float | None = None
        self._swarm_samples_per_second = float("nan")
        self._backup: dict | None = None
        self._publisher = None  # MetricsPublisher, once the DHT runs
        self._failures = None  # AveragingFailureCounter while in the swarm
        self._failures_seen = 0
        self._epoch_loss_sum: torch.Tensor | None = None  # this peer's losses in the current epoch
        self._epoch_mini_steps = 0
        self._samples_contributed = 0
        self.skipped_steps = 0
        self.restored_backups = 0
        self._previous_sigint = None
        self._stop_requested = False

    def check_options(self) -> None:
        """Check every option at once and resolve the addresses; one UserError lists all problems.

        Runs at the first hook (`setup_environment`), not in __init__: jsonargparse wraps errors
        raised while it instantiates the strategy into a long Union message.
        """
        from convmodel.collaborative.dht import check_multiaddrs, parse_peer_list, resolve_initial_peers

        problems = []
        run_id = self.run_id
        if not isinstance(run_id, str) or not run_id.strip():
            problems.append("run_id must be a non-empty name")
        elif "." in run_id or any(c.isspace() for c in run_id):
            problems.append(f"run_id {run_id!r} must not contain dots or spaces (hivemind uses dots in DHT keys); "
                            f"e.g. {run_id.replace('.', '_').replace(' ', '_')!r}")
        for name, value, low in (("target_batch_size", self.target_batch_size, 1), ("average_state_every", self.average_state_every, 1),
                                 ("backup_every_epochs", self.backup_every_epochs, 0)):
            if not isinstance(value, int) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("matchmaking_time", self.matchmaking_time), ("averaging_timeout", self.averaging_timeout),
                            ("load_state_timeout", self.load_state_timeout), ("bootstrap_timeout", self.bootstrap_timeout),
                            ("metadata_expiration", self.metadata_expiration),
                            ("next_chunk_timeout", self.next_chunk_timeout), ("bandwidth", self.bandwidth)):
            if value is not None and not value > 0:
                problems.append(f"{name} must be > 0, got {value!r}")
        for name, value in (("grad_compression", self.grad_compression),
                            ("state_averaging_compression", self.state_averaging_compression)):
            if value not in COMPRESSION_NAMES:
                problems.append(f"{name} must be one of {', '.join(COMPRESSION_NAMES)}, got {value!r}")
        if self.delay_optimizer_step and not self.offload_optimizer:
            problems.append("delay_optimizer_step needs offload_optimizer: true")
        if self.delay_grad_averaging and not self.delay_optimizer_step:
            problems.append("delay_grad_averaging needs delay_optimizer_step: true")
        if self.max_collaborative_epochs is not None and self.max_collaborative_epochs < 1:
            problems.append(f"max_collaborative_epochs must be >= 1, got {self.max_collaborative_epochs!r}")
        if problems:
            raise UserError(f"{OPTION}: " + "; ".join(problems))
        self.initial_peers = resolve_initial_peers(self._initial_peers_option)
        self.host_maddrs = check_multiaddrs(parse_peer_list(self._host_maddrs_option, f"{OPTION}.host_maddrs")
                                            or ["/ip4/0.0.0.0/tcp/0"], f"{OPTION}.host_maddrs", need_peer_id=False)
        self.announce_maddrs = check_multiaddrs(parse_peer_list(self._announce_maddrs_option, f"{OPTION}.announce_maddrs"),
                                                f"{OPTION}.announce_maddrs", need_peer_id=False) or None

    # ---- devices ------------------------------------------------------------------------------

    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[0] if self.parallel_devices else self._root_device

    @override
    def setup_environment(self) -> None:
        self.check_options()
        devices = self.parallel_devices or []
        if len(devices) > 1:
            raise UserError(
                f"trainer.devices: HivemindStrategy trains on one device per peer, but {len(devices)} were asked "
                f"({', '.join(map(str, devices))}); set trainer.devices: 1 and start one peer per GPU "
                "(e.g. CUDA_VISIBLE_DEVICES=1 with its own identity_path)")
        super().setup_environment()

    @override
    def setup(self, trainer) -> None:
        if trainer.num_nodes > 1:
            raise UserError("trainer.num_nodes: HivemindStrategy runs one peer per process; set trainer.num_nodes: 1 "
                            "and start a peer on each machine with initial_peers")
        scaler = getattr(self.precision_plugin, "scaler", None)
        if scaler is not None:
            raise UserError("trainer.precision: 16-mixed needs a loss scaler that hivemind does not share with "
                            "Lightning yet; use precision: bf16-mixed (or 32)")
        super().setup(trainer)

    # ---- Ctrl-C ---------------------------------------------------------------------------------

    def _handle_ctrl_c(self, previous) -> None:
        """Ctrl-C: finish the current step, say goodbye to the swarm and exit; a second Ctrl-C stops at once.

        hivemind's averagers set SIGINT to "ignore" in this process before they fork and never put it
        back, so Ctrl-C would do nothing; and a KeyboardInterrupt raised inside a hivemind call can leave
        a lock held that the goodbye then waits on forever. So the first Ctrl-C only asks the trainer
        to stop after this batch (a clean leave the others notice within one matchmaking round).
        """
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous_sigint = previous if previous is not None else signal.default_int_handler

        def on_ctrl_c(signum, frame):
            trainer = self.lightning_module.trainer if self.lightning_module is not None else None
            if self._stop_requested or trainer is None:
                signal.signal(signal.SIGINT, self._previous_sigint)
                raise KeyboardInterrupt
            self._stop_requested = True
            trainer.should_stop = True
            print("[convmodel] Ctrl-C: leaving the swarm after this step (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

        signal.signal(signal.SIGINT, on_ctrl_c)

    def _restore_ctrl_c(self) -> None:
        previous, self._previous_sigint = self._previous_sigint, None
        if previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)

    # ---- the optimizer ------------------------------------------------------------------------

    @override
    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)  # the module's configure_optimizers: one optimizer, one schedule
        if len(self.optimizers) != 1:
            raise UserError(f"HivemindStrategy needs exactly one optimizer from configure_optimizers, got "
                            f"{len(self.optimizers)}")
        module_optimizer = self.optimizers[0]
        scheduler = self.lr_scheduler_configs[0].scheduler if self.lr_scheduler_configs else None
        clip_val, clip_algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
        sigint_handler = signal.getsignal(signal.SIGINT)
        try:
            self.join_swarm(module_optimizer, scheduler, clip_val, str(clip_algorithm or "norm"))
        finally:
            if self.hivemind_optimizer is not None:
                self._handle_ctrl_c(sigint_handler)
            elif sigint_handler is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, sigint_handler)  # a failed start: leave Ctrl-C as it was
        # hivemind steps the schedule once per collaborative epoch; Lightning must not step it per batch
        self.optimizers = [self.hivemind_optimizer]
        self.lr_scheduler_configs = []

    def join_swarm(self, module_optimizer: torch.optim.Optimizer, scheduler=None, clip_val: float | None = None,
                   clip_algorithm: str = "norm", auxiliary: bool = False, extra_validators: list = ()):
        """Check the options, start the DHT and build the hivemind.Optimizer; returns the optimizer.

        The trainer calls it from `setup_optimizers`; the auxiliary peer (no Lightning loop) calls it
        with `auxiliary=True` to help average, or False to only download and store the swarm's state.
        `extra_validators` are added to the DHT's record validators (the monitor counts rejections).
        """
        self.check_options()
        if auxiliary and self.client_mode:
            raise UserError(f"{OPTION}.client_mode: an auxiliary peer that assists in averaging must accept "
                            "connections; set client_mode: false (or do not assist in averaging)")
        self._start_dht(list(extra_validators))
        from convmodel.collaborative.averaging_failures import AveragingFailureCounter

        self._failures = AveragingFailureCounter().attach()
        self.hivemind_optimizer = self._make_hivemind_optimizer(module_optimizer, scheduler, clip_val, clip_algorithm,
                                                                auxiliary)
        return self.hivemind_optimizer

    def start_dht(self, extra_validators: list = ()) -> None:
        """Check the options and start only the DHT (prints the join address, writes peers_file): for a
        peer that holds no hivemind.Optimizer, such as the auxiliary peer that only stores checkpoints."""
        self.check_options()
        self._start_dht(list(extra_validators))

    def _start_dht(self, extra_validators: list) -> None:
        from convmodel.collaborative.dht import announce_addresses, metrics_key, start_dht
        from convmodel.collaborative.metrics import metrics_validators

        validators, self._metrics_signer = metrics_validators(self.run_id, metrics_key(self.identity_path))
        self.dht = start_dht(
            self.initial_peers, self.host_maddrs, self.announce_maddrs, self.identity_path, self.client_mode,
            self.use_ipfs, self.use_relay, self.use_auto_relay, self.nat_port_map, self.auto_nat,
            self.bootstrap_timeout, record_validators=[*validators, *extra_validators])
        if self.client_mode:
            print(f"[convmodel] peer {self.dht.peer_id} joined in client mode (it cannot be an initial peer)",
                  flush=True)
        else:
            self.peer_addresses = announce_addresses(self.dht, self.peers_file)

    @property
    def request_timeout(self) -> float:
        """Seconds an averager waits for a peer's answer: matchmaking warns (and may stall) when a
        request can outlive the matchmaking window."""
        return max(0.2, min(3.0, self.matchmaking_time / 2))

    def _make_hivemind_optimizer(self, module_optimizer, scheduler, clip_val, clip_algorithm: str, auxiliary: bool):
        from hivemind.optim.grad_averager import GradientAverager

        from convmodel.collaborative.compression import build_compression

        optimizer_factory, param_groups = rebuild_optimizer(module_optimizer, clip_val, clip_algorithm)
        scheduler_factory = rebuild_scheduler(scheduler)
        averager_opts: dict[str, Any] = {"request_timeout": self.request_timeout}
        if self.bandwidth is not None:
            averager_opts["bandwidth"] = self.bandwidth

        def grad_averager_factory(**kwargs):
            return GradientAverager(**kwargs, **averager_opts)

        # hivemind steps a fresh schedule to the current epoch before the first optimizer step
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        optimizer_class = _swarm_optimizer_class()
        return optimizer_class(
            dht=self.dht,
            run_id=self.run_id,
            target_batch_size=self.target_batch_size,
            optimizer=optimizer_factory,
            params=param_groups,
            scheduler=scheduler_factory,
            matchmaking_time=self.matchmaking_time,
            averaging_timeout=self.averaging_timeout,
            load_state_timeout=self.load_state_timeout,
            next_chunk_timeout=self.next_chunk_timeout,
            reuse_grad_buffers=self.reuse_grad_buffers,
            offload_optimizer=self.offload_optimizer,
            delay_optimizer_step=self.delay_optimizer_step,
            delay_grad_averaging=self.delay_grad_averaging,
            delay_state_averaging=self.delay_state_averaging,
            average_state_every=self.average_state_every,
            client_mode=self.client_mode,
            auxiliary=auxiliary,
            grad_compression=build_compression(self.grad_compression, "grad_compression"),
            state_averaging_compression=build_compression(self.state_averaging_compression,
                                                          "state_averaging_compression"),
            grad_averager_factory=grad_averager_factory,
            tracker_opts={"metadata_expiration": self.metadata_expiration},
            averager_opts=averager_opts,
            verbose=self.verbose,
        )

    # ---- joining and resuming ------------------------------------------------------------------

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        # hivemind.Optimizer.state_dict carries local_epoch; after loading it the schedule must follow
        super().load_optimizer_state_dict(checkpoint)
        if self.hivemind_optimizer is not None:
            sync_scheduler(self.hivemind_optimizer)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        opt = self.hivemind_optimizer
        if opt is None:
            return
        before = opt.local_epoch
        opt.load_state_from_peers()  # keeps ours if the swarm is behind (a resumed peer that is ahead)
        sync_scheduler(opt)
        if opt.local_epoch != before:
            print(f"[convmodel] joined run {self.run_id!r} at collaborative epoch {opt.local_epoch}: "
                  "downloaded the swarm's parameters and optimizer state", flush=True)
        else:
            print(f"[convmodel] training run {self.run_id!r} from collaborative epoch {opt.local_epoch} "
                  "(no peer further ahead)", flush=True)
        self._epoch_seen, self._epoch_started_at = opt.local_epoch, time.perf_counter()
        self._take_backup()
        self._publish_metrics(opt)  # counted by the monitor from the start, not only after an epoch

    # ---- stepping ------------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any):
        output = super().training_step(*args, **kwargs)
        if self.hivemind_optimizer is None:
            return output
        batch = args[0] if args else kwargs.get("batch")
        try:
            self._samples_since_step += int(extract_batch_size(batch))
        except Exception:  # a batch Lightning cannot measure counts as one sample
            self._samples_since_step += 1
        loss = output["loss"] if isinstance(output, dict) else output
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            self._non_finite_loss = True
        elif isinstance(loss, torch.Tensor):
            # a tensor sum: no device sync per step; read once per collaborative epoch
            loss = loss.detach().float().sum()
            self._epoch_loss_sum = loss if self._epoch_loss_sum is None else self._epoch_loss_sum + loss
            self._epoch_mini_steps += 1
        self._log_progress()
        return output

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        opt = self.hivemind_optimizer
        if opt is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        # run forward/backward ourselves: Lightning's precision plugin would clip each local
        # gradient, and clipping belongs to the swarm's averaged gradient (see rebuild_optimizer)
        closure_result = closure()
        trainer = self.lightning_module.trainer
        call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
        call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
        samples, self._samples_since_step = self._samples_since_step, 0
        if self._non_finite_loss or not _grads_finite(opt):
            self._skip_step(opt)
            # non-finite parameters make every later loss non-finite too: skipping alone would stall forever
            if not _params_finite(opt):
                self._restore_backup(opt)
        else:
            opt.step(batch_size=max(samples, 1))
            self._samples_contributed += samples
        self._after_step(opt, trainer)
        return closure_result

    def _skip_step(self, opt) -> None:
        """Drop this step's gradients so a NaN/inf never reaches the swarm's average."""
        self._non_finite_loss = False
        self.skipped_steps += 1
        print(f"[convmodel] non-finite loss or gradients: skipped a local step (total {self.skipped_steps})",
              file=sys.stderr, flush=True)
        with torch.no_grad():
            for p in _main_params(opt):
                if p.grad is not None:
                    p.grad.zero_()
        if self.reuse_grad_buffers:
            opt.grad_averager.reset_accumulated_grads_()
            opt.tracker.report_local_progress(opt.local_epoch, opt.grad_averager.local_samples_accumulated)

    def _after_step(self, opt, trainer) -> None:
        epoch = opt.local_epoch
        if self._epoch_seen is None or epoch == self._epoch_seen:
            return
        now = time.perf_counter()
        seconds = now - self._epoch_started_at if self._epoch_started_at is not None else float("nan")
        if epoch == self._epoch_seen + 1:
            self._swarm_samples_per_second = self.target_batch_size / max(seconds, 1e-9)
        self._epoch_seen, self._epoch_started_at = epoch, now
        peers = max(opt.tracker.global_progress.num_peers, 1)  # 0 until the first progress fetch
        failures = self._failures.gradients + self._failures.state if self._failures is not None else 0
        failed = f", {failures - self._failures_seen} averaging round(s) failed" if failures > self._failures_seen else ""
        self._failures_seen = failures
        # the seconds since the previous epoch line: a stalled swarm shows here first
        print(f"[convmodel] collaborative epoch {epoch} ({peers} peer{'s' if peers != 1 else ''}, "
              f"lr {opt.param_groups[0]['lr']:.3g}, {seconds:.2f} s{failed})", flush=True)
        if not _params_finite(opt):
            self._restore_backup(opt)
        elif self.backup_every_epochs and epoch % self.backup_every_epochs == 0:
            self._take_backup()
        self._publish_metrics(opt)
        if self.max_collaborative_epochs is not None and epoch >= self.max_collaborative_epochs:
            trainer.should_stop = True

    def _take_backup(self) -> None:
        opt = self.hivemind_optimizer
        if not self.backup_every_epochs or opt is None:
            return
        self._backup = {
            "epoch": opt.local_epoch,
            "params": [p.detach().clone() for p in _main_params(opt)],
            "optimizer": copy.deepcopy(opt.opt.state_dict()),
        }

    def _restore_backup(self, opt) -> None:
        """Non-finite parameters after a step: go back to the last backup (or the swarm's state)."""
        self.restored_backups += 1
        if self._backup is None:
            print("[convmodel] non-finite parameters and no backup: loading the swarm's state", file=sys.stderr)
            opt.load_state_from_peers()
            return
        print(f"[convmodel] non-finite parameters at collaborative epoch {opt.local_epoch}: restoring the backup "
              f"from epoch {self._backup['epoch']}", file=sys.stderr, flush=True)
        with torch.no_grad():
            inner = [p for g in opt.opt.param_groups for p in g["params"]]
            for saved, main, offloaded in zip(self._backup["params"], _main_params(opt), inner):
                main.copy_(saved)
                if offloaded is not main:
                    offloaded.copy_(saved)
        opt.opt.load_state_dict(copy.deepcopy(self._backup["optimizer"]))

    # ---- what Lightning and the swarm see ----------------------------------------------------------

    def _log_progress(self) -> None:
        opt, module = self.hivemind_optimizer, self.lightning_module
        progress = opt.tracker.global_progress
        values = {
            "collab/epoch": float(opt.local_epoch),
            "collab/peers": float(max(progress.num_peers, 1)),
            "collab/samples_accumulated": float(progress.samples_accumulated),
            "collab/local_samples_per_second": float(opt.tracker.performance_ema.samples_per_second),
            "collab/skipped_steps": float(self.skipped_steps),
        }
        if self._failures is not None:
            values["collab/failed_gradient_rounds"] = float(self._failures.gradients)
            values["collab/failed_state_rounds"] = float(self._failures.state)
        if not math.isnan(self._swarm_samples_per_second):
            values["collab/samples_per_second"] = self._swarm_samples_per_second
        for name, value in values.items():
            module.log(name, value, on_step=True, on_epoch=False, batch_size=1,
                       prog_bar=name in ("collab/epoch", "collab/peers"))

    def _publish_metrics(self, opt) -> None:
        """This peer's record for the monitor: the epoch it is in now, and its loss summed over the local
        steps of the epoch that just ended (the monitor divides the swarm's sums: a mean over all steps)."""
        from convmodel.collaborative.publisher import MetricsPublisher

        if self._publisher is None:
            self._publisher = MetricsPublisher(self.dht, self.run_id, self._metrics_signer, self.metadata_expiration)
        loss_sum = float(self._epoch_loss_sum) if self._epoch_loss_sum is not None else None
        self._publisher.publish(
            epoch=opt.local_epoch, samples_per_second=float(opt.tracker.performance_ema.samples_per_second),
            samples_accumulated=self._samples_contributed, loss=loss_sum, mini_steps=self._epoch_mini_steps)
        self._epoch_loss_sum, self._epoch_mini_steps = None, 0

    # ---- leaving -----------------------------------------------------------------------------------

    @override
    def teardown(self) -> None:
        opt, dht = self.hivemind_optimizer, self.dht
        self.hivemind_optimizer = self.dht = None
        if opt is not None:
            try:
                opt.shutdown()
            except Exception as exc:  # a failed goodbye must not hide the run's own outcome
                print(f"[convmodel] hivemind optimizer shutdown: {exc!r}", file=sys.stderr)
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            publisher.close()
        failures, self._failures = self._failures, None
        if failures is not None:
            failures.detach()
        if dht is not None:
            dht.shutdown()
        self._restore_ctrl_c()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description=cls.__doc__.splitlines()[0],
                                   override=True)


def rebuild_optimizer(module_optimizer: torch.optim.Optimizer, clip_val: float | None, clip_algorithm: str):
    """A factory that builds the module's optimizer again on the tensors hivemind gives it.

    hivemind needs a callable for offloading and delayed steps; the module already chose the
    class, hyperparameters and parameter groups, so we keep them (and the peak lr, before the
    schedule scaled it). Clipping is a step pre-hook on the rebuilt optimizer, so it applies to
    the swarm's averaged gradient once per collaborative epoch.
    """
    cls = type(module_optimizer)
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in module_optimizer.defaults.items() if k in accepted and k != "params"}
    groups = []
    for group in module_optimizer.param_groups:
        group = dict(group)
        group["lr"] = group.pop("initial_lr", group["lr"])  # LambdaLR's base lr, not the warmed-up one
        groups.append(group)

    def factory(param_groups):
        optimizer = cls(param_groups, **kwargs)
        if clip_val:
            optimizer.register_step_pre_hook(_clip_hook(float(clip_val), clip_algorithm))
        return optimizer

    return factory, groups


def _clip_hook(clip_val: float, algorithm: str):
    def clip(optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_val)

    return clip


def rebuild_scheduler(scheduler):
    """A factory for the module's schedule on hivemind's optimizer; it steps once per collaborative epoch."""
    if scheduler is None:
        return None
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if type(scheduler) is torch.optim.lr_scheduler.LambdaLR and lambdas:
        return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, list(lambdas))
    raise UserError(f"HivemindStrategy can rebuild a LambdaLR schedule only, the module returned "
                    f"{type(scheduler).__name__}; return a LambdaLR from configure_optimizers")


def sync_scheduler(opt) -> None:
    """Step hivemind's schedule until it matches the collaborative epoch (after a checkpoint load)."""
    scheduler = opt.state_averager.scheduler
    if scheduler is None:
        return
    while scheduler.last_epoch < opt.local_epoch:
        scheduler.step()


def _main_params(opt) -> list[torch.Tensor]:
    return list(opt.state_averager.main_parameters)


def _params_finite(opt) -> bool:
    return all(torch.isfinite(p).all() for p in _main_params(opt))


def _grads_finite(opt) -> bool:
    return all(p.grad is None or torch.isfinite(p.grad).all() for p in _main_params(opt))


_OPTIMIZER_CLASS = None


def _swarm_optimizer_class():
    """hivemind.Optimizer whose zero_grad leaves reused gradient buffers alone (Lightning calls it each step)."""
    global _OPTIMIZER_CLASS
    if _OPTIMIZER_CLASS is None:
        import hivemind

        class SwarmOptimizer(hivemind.Optimizer):
            """hivemind.Optimizer that Lightning can wrap.

            Lightning's LightningOptimizer copies the optimizer's __dict__ into a subclass
            instance; hivemind's __del__ would shut the averagers down when that copy is
            collected. Only the original shuts down on deletion (teardown does it anyway).
            """

            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self._original_id = id(self)

            def __del__(self):
                if getattr(self, "_original_id", None) == id(self):
                    super().__del__()

            @property
            def defaults(self) -> dict:
                return self.state_averager.optimizer.defaults  # read by LearningRateMonitor

            def zero_grad(self, set_to_none: bool = True):
                if self.use_gradient_averaging and self.grad_averager.reuse_grad_buffers:
                    return  # hivemind zeroes its accumulators after each collaborative epoch
                super().zero_grad(set_to_none)

        _OPTIMIZER_CLASS = SwarmOptimizer
    return _OPTIMIZER_CLASS


HivemindStrategy.register_strategies(StrategyRegistry)
