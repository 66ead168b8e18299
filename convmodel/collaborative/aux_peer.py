"""The auxiliary peer: the swarm's memory and dashboard, run by volunteers without a GPU.

    python trainer/run_aux_peer.py --config configs/collaborative/bert-tiny.yaml \\
        [--store_checkpoints DIR] [--checkpoint_every N] [--push_to_hub ORG/NAME --upload_every SECONDS] \\
        [--assist_in_averaging] [--logdir DIR] [--trainer.strategy.init_args.initial_peers ...]

It reads the trainers' own YAML (run_id, addresses, model and optimizer) and, until SIGINT/SIGTERM:

- joins the DHT and prints the address other peers join with (it can be the swarm's first peer);
- every `refresh_period` seconds reads the peers' signed metrics records (SwarmMonitor: a status
  line and swarm/* TensorBoard scalars in --logdir);
- every `checkpoint_every` collaborative epochs downloads the swarm's state (parameters, optimizer
  state, epoch) and stores it as a Lightning checkpoint (checkpoint_store.py), and every
  `upload_every` seconds exports the newest one to a Hugging Face folder pushed to the Hub;
- serves the state it holds to peers that join, with the epoch as its priority: a trainer that
  starts while only the auxiliary peer is up begins from the last stored state ("the first peer of
  the day"); `trainer.py --ckpt_path DIR/latest.ckpt` does the same without it;
- with --assist_in_averaging, takes part in averaging rounds (hivemind's auxiliary mode) so that
  peers in client mode (behind NAT) always have a partner that accepts connections.

Without --assist_in_averaging it creates no hivemind.Optimizer (no progress reports, no averaging
rounds to wait for): it holds only a hivemind TrainingStateAverager under the trainers' prefix, with
the same tensors, enough to download and serve the state. Either way the trainers do not count it in
their number of peers: hivemind reports progress only for peers that accumulate samples.
"""

import dataclasses
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field

from convmodel.cli import ConvmodelCLI, enable_docstring_help, exit_on_user_error
from convmodel.errors import UserError, user_message

EXPORT_FOLDER = "export"  # inside --store_checkpoints: the exported model that --push_to_hub uploads


@dataclass
class AuxPeerOptions:
    """The auxiliary peer's own options (the rest comes from the trainers' YAML)."""

    store_checkpoints: str | None = field(default=None, metadata={"help": (
        "Folder for the swarm's checkpoints (epoch-N.ckpt and latest.ckpt, which trainer.py --ckpt_path resumes "
        "from and export_model.py exports); a checkpoint already there is loaded and served to joining peers.")})
    checkpoint_every: int = field(default=5, metadata={"help": (
        "Store a checkpoint when the swarm is this many collaborative epochs past the last stored one.")})
    keep_checkpoints: int = field(default=3, metadata={"help": "How many epoch-N.ckpt files to keep."})
    push_to_hub: str | None = field(default=None, metadata={"help": (
        "Export the newest checkpoint and upload it to this Hub repository (NAME or ORG/NAME) every upload_every "
        "seconds; needs --store_checkpoints. The token comes from HF_TOKEN or `hf auth login`.")})
    upload_every: float = field(default=3600.0, metadata={"help": "Seconds between uploads to the Hub."})
    assist_in_averaging: bool = field(default=False, metadata={"help": (
        "Take part in averaging rounds (hivemind's auxiliary mode) so that peers in client mode have a partner; "
        "needs trainer.strategy.init_args.client_mode: false.")})
    assist_every: float = field(default=1.0, metadata={"help": (
        "Seconds between the assisting peer's checks for an averaging round to join.")})
    refresh_period: float = field(default=30.0, metadata={"help": (
        "Seconds between reads of the swarm's metrics (and checkpoint decisions).")})
    logdir: str | None = field(default=None, metadata={"help": (
        "TensorBoard folder for the swarm/* scalars (epoch, loss, alive_peers, samples_per_second, samples).")})

    @classmethod
    def add_arguments(cls, parser) -> None:
        from jsonargparse import ActionYesNo

        for option in dataclasses.fields(cls):
            if option.type is bool:
                parser.add_argument(f"--{option.name}", action=ActionYesNo, default=option.default,
                                    help=option.metadata["help"])
            else:
                parser.add_argument(f"--{option.name}", type=option.type, default=option.default,
                                    help=option.metadata["help"])

    @classmethod
    def help_text(cls) -> str:
        """`run_aux_peer.py --help`: these options, then a pointer to the trainers' options it also takes.

        LightningCLI's own help lists every trainer, model and data option (hundreds of lines),
        which the auxiliary peer reads from the YAML but does not use itself.
        """
        import textwrap

        lines = ["usage: run_aux_peer.py --config CONFIG.yaml [options] [trainer.py overrides]", "",
                 "Join the trainers' swarm as its monitor, checkpoint store and averaging helper (no GPU needed).",
                 "", "options:", "  --config CONFIG.yaml",
                 "      the trainers' collaborative YAML (trainer.strategy: HivemindStrategy),",
                 "      e.g. configs/collaborative/bert-tiny.yaml"]
        for option in dataclasses.fields(cls):
            flag = f"--{option.name}" if option.type is bool else f"--{option.name} {option.name.upper()}"
            default = "" if option.default is None or option.type is bool else f" (default: {option.default})"
            lines.append(f"  {flag}")
            lines += textwrap.wrap(option.metadata["help"] + default, 100, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
        lines += ["  -h, --help", "      print this help and exit", "",
                  "The trainers' options are accepted too and override the YAML as in trainer.py, e.g.",
                  "--trainer.strategy.init_args.initial_peers '[/ip4/...]' or --data.tokenizer DIR; they are "
                  "listed by",
                  "`python trainer/trainer.py fit --help`."]
        return "\n".join(lines)

    @classmethod
    def from_config(cls, config) -> "AuxPeerOptions":
        return cls(**{option.name: config[option.name] for option in dataclasses.fields(cls)})

    def check(self, strategy) -> None:
        """Every problem with the options at once, each naming its flag."""
        from convmodel.export import check_repo_id

        problems = []
        for name, low in (("checkpoint_every", 1), ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"--{name} must be an integer >= {low}, got {value!r}")
        for name in ("upload_every", "assist_every", "refresh_period"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not value > 0 or not math.isfinite(value):
                problems.append(f"--{name} must be a number of seconds > 0, got {value!r}")
        if self.push_to_hub is not None:
            try:
                check_repo_id(str(self.push_to_hub))
            except UserError as exc:
                problems.append(str(exc))
            if self.store_checkpoints is None:
                problems.append("--push_to_hub uploads the stored checkpoints: add --store_checkpoints DIR")
        if self.assist_in_averaging and strategy.client_mode:
            problems.append("--assist_in_averaging: a peer that assists in averaging must accept connections, but "
                            "trainer.strategy.init_args.client_mode is true; set it to false (and make this peer "
                            "reachable), or leave out --assist_in_averaging")
        if problems:
            raise UserError("; ".join(problems))


class AuxPeerCLI(ConvmodelCLI):
    """The trainers' CLI (same YAML, same overrides) plus the auxiliary peer's options at the top level."""

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        AuxPeerOptions.add_arguments(parser)


class SwarmState:
    """The copy of the swarm's training state this peer holds: downloaded, loaded, served and stored.

    `averager` is a TrainingStateAverager under the trainers' prefix: our own (download and serve
    only) or, when assisting, the one inside the auxiliary hivemind.Optimizer `opt`. `lock` serialises
    everything that touches it (downloads, checkpoint copies, the assisting thread's steps).

    `epoch` is the collaborative epoch of the parameters held (None until a real state arrives).
    When assisting, the optimizer's own epoch moves on with the swarm while its parameters stay (an
    auxiliary peer never steps them); the state is served only while both epochs agree, so that a
    joining peer never receives old parameters under a new epoch.
    """

    def __init__(self, strategy, averager, opt=None):
        self.strategy, self.averager, self.opt = strategy, averager, opt
        self.lock = threading.Lock()
        self.epoch: int | None = None

    @classmethod
    def download_only(cls, strategy, module_optimizer, scheduler):
        """A TrainingStateAverager like the trainers' (same prefix, tensors and schedule) and no optimizer."""
        from hivemind.optim.state_averager import TrainingStateAverager

        from convmodel.collaborative.strategy import rebuild_optimizer, rebuild_scheduler

        optimizer_factory, param_groups = rebuild_optimizer(module_optimizer, None, "norm")
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        averager = TrainingStateAverager(
            dht=strategy.dht, prefix=f"{strategy.run_id}_state_averager", optimizer=optimizer_factory,
            params=param_groups, scheduler=rebuild_scheduler(scheduler), offload_optimizer=False,
            client_mode=strategy.client_mode, allow_state_sharing=False,
            min_matchmaking_time=strategy.matchmaking_time, next_chunk_timeout=strategy.next_chunk_timeout,
            request_timeout=strategy.request_timeout, start=True)
        return cls(strategy, averager)

    def load_checkpoint(self, checkpoint: dict, module) -> int:
        """Take the state of a stored checkpoint (to serve it and to store on from it); returns its epoch."""
        import torch

        from convmodel.collaborative.checkpoint_store import checkpoint_epoch

        epoch = checkpoint_epoch(checkpoint)
        optimizer_state = checkpoint["optimizer_states"][0]
        optimizer_state = dict(optimizer_state, state={k: v for k, v in optimizer_state["state"].items()
                                                       if k != "local_epoch"})
        with self.lock, torch.no_grad():
            module.load_state_dict(checkpoint["state_dict"])
            inner = [p for group in self.averager.optimizer.param_groups for p in group["params"]]
            for main, offloaded in zip(self.averager.main_parameters, inner):
                if offloaded is not main:  # offload_optimizer: the optimizer keeps its own copy
                    offloaded.copy_(main)
            self.averager.optimizer.load_state_dict(optimizer_state)
            self._set_local_epoch(max(epoch, self.averager.local_epoch))
            self.epoch = epoch
            self._update_sharing()
        return epoch

    def download(self) -> bool:
        """Fetch the newest state a peer shares; True when it is newer than the one held.

        TrainingStateAverager refuses a state older than its local epoch and says nothing of what it
        did, so the local epoch is set to the held state's epoch for the call: a higher one after it
        means a newer state arrived.
        """
        with self.lock:
            averager, held = self.averager, self.epoch or 0
            own_epoch = averager.local_epoch  # differs from held only while not serving (see _update_sharing)
            averager.local_epoch = held
            try:
                averager.load_state_from_peers(timeout=self.strategy.load_state_timeout)
            finally:
                received = averager.local_epoch
                self._set_local_epoch(max(own_epoch, received))
                if received > held:
                    self.epoch = received
                self._update_sharing()
            return received > held

    def _set_local_epoch(self, epoch: int) -> None:
        """Set the epoch of the state averager (and of the optimizer's progress report) and its schedule."""
        averager = self.averager
        if self.opt is None:
            averager.local_epoch = epoch
        else:
            tracker = self.opt.tracker
            with tracker.pause_updates():
                averager.local_epoch = epoch
                if tracker.local_progress.epoch != epoch:
                    tracker.report_local_progress(local_epoch=epoch, samples_accumulated=0)
        if averager.scheduler is not None:
            while averager.scheduler.last_epoch < epoch:
                averager.scheduler.step()

    def _update_sharing(self) -> None:
        """Serve the state to joining peers when it is real and its epoch is the one we report."""
        averager = self.averager
        if self.strategy.client_mode:
            return
        share = self.epoch is not None and averager.local_epoch == self.epoch
        if share:
            averager.state_sharing_priority = float(self.epoch)
        if averager.allow_state_sharing != share:
            averager.allow_state_sharing = share

    def checkpoint(self, module, datamodule, metrics: dict[str, float]) -> dict:
        """A checkpoint of the held state (copied under the lock; written to disk by the caller)."""
        import copy

        from convmodel.collaborative.checkpoint_store import make_checkpoint

        with self.lock:
            checkpoint = make_checkpoint(module, self.averager.optimizer.state_dict(), self.epoch,
                                         datamodule=datamodule, metrics=metrics, run_id=self.strategy.run_id)
            checkpoint["state_dict"] = {name: value.clone() for name, value in checkpoint["state_dict"].items()}
            checkpoint["optimizer_states"] = copy.deepcopy(checkpoint["optimizer_states"])
        return checkpoint

    def assist(self) -> None:
        """One step of hivemind's auxiliary mode: join the averaging round when the swarm ends an epoch."""
        opt = self.opt
        with self.lock:
            if opt.local_epoch < opt.tracker.global_epoch - 1:
                # far behind (a long download held the lock): follow the swarm's epoch rather than step
                # through every missed epoch with an averaging round of its own
                self._set_local_epoch(opt.tracker.global_epoch)
            if opt.tracker.ready_to_update_epoch and self.averager.allow_state_sharing:
                self.averager.allow_state_sharing = False  # the epoch moves on; our parameters stay
            opt.step()
            self._update_sharing()

    def shutdown(self) -> None:
        if self.opt is None:  # the strategy's teardown shuts its own optimizer down
            self.averager.shutdown()


class AuxiliaryPeer:
    """The loop: refresh the monitor, store checkpoints, upload, until SIGINT/SIGTERM."""

    def __init__(self, module, trainer, datamodule, options: AuxPeerOptions):
        from convmodel.collaborative.checkpoint_store import CheckpointStore

        self.module, self.trainer, self.datamodule, self.options = module, trainer, datamodule, options
        self.strategy = trainer.strategy
        self.store = (CheckpointStore(options.store_checkpoints, options.keep_checkpoints)
                      if options.store_checkpoints else None)
        self.state: SwarmState | None = None
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
        self._previous_handlers: dict[int, object] = {}

    # ---- joining ------------------------------------------------------------------------------

    def join(self) -> None:
        """Start the DHT (printing the join address) and the state averager; load the stored checkpoint."""
        from convmodel.collaborative.monitor import SwarmMonitor, monitor_validators

        strategy, options = self.strategy, self.options
        self.module.trainer = self.trainer  # configure_optimizers reads trainer.max_steps when total_steps is unset
        optimizer, scheduler = _module_optimizer(self.module)
        validators = monitor_validators(strategy.run_id)
        if options.assist_in_averaging:
            opt = strategy.join_swarm(optimizer, scheduler, self.trainer.gradient_clip_val,
                                      str(self.trainer.gradient_clip_algorithm or "norm"), auxiliary=True,
                                      extra_validators=validators)
            self.state = SwarmState(strategy, opt.state_averager, opt)
        else:
            strategy.start_dht(validators)
            if self.store is not None:
                self.state = SwarmState.download_only(strategy, optimizer, scheduler)
        self.monitor = SwarmMonitor(strategy.dht, strategy.run_id, options.logdir)
        self._catch_signals()
        if self.store is not None:
            self._load_stored()
        if self.state is not None:
            self._download("joined")

    def _load_stored(self) -> None:
        from convmodel.collaborative.checkpoint_store import read_checkpoint

        path = self.store.latest()
        if self.store.removed_temp_files:
            print(f"[convmodel] removed {len(self.store.removed_temp_files)} unfinished checkpoint file(s) from "
                  f"{self.store.directory} (a write was interrupted)", flush=True)
        if path is None:
            return
        checkpoint = read_checkpoint(path)
        ours = checkpoint.get("convmodel", {}).get("collaborative", {})
        if ours.get("run_id") not in (None, self.strategy.run_id):
            raise UserError(f"--store_checkpoints {self.store.directory} holds checkpoints of run "
                            f"{ours['run_id']!r}, but the config's run_id is {self.strategy.run_id!r}; give another "
                            "folder, or set trainer.strategy.init_args.run_id")
        try:
            self.module.on_load_checkpoint(checkpoint)  # one message for another tokenizer or model size
        except UserError as exc:
            raise UserError(f"--store_checkpoints {path}: {exc}") from exc
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
        """Join, then refresh until asked to stop; the last checkpoint is written before leaving."""
        try:
            self.join()
            if self.options.assist_in_averaging:
                self._assist_thread = threading.Thread(target=self._assist, name="convmodel-assist", daemon=True)
                self._assist_thread.start()
            while not self.stop.is_set():
                self.refresh()
                self.stop.wait(self.options.refresh_period)
            self._final_checkpoint()
        finally:
            self.leave()

    def refresh(self) -> None:
        snapshot = self.monitor.refresh()
        self.alive_peers = snapshot.alive_peers if snapshot is not None else 0
        if snapshot is not None:
            self.swarm_epoch = max(snapshot.epoch, self.swarm_epoch or 0)
            self.swarm_loss = snapshot.loss
        if self.store is not None and self._checkpoint_due():
            self._tried_at_epoch = self.swarm_epoch
            if self._download("checkpoint"):
                self._store()
        self._maybe_upload()

    def _checkpoint_due(self) -> bool:
        """The swarm is checkpoint_every epochs past the stored state (and has moved since the last try:
        when no peer could send its state, e.g. all are in client mode, ask again one epoch later)."""
        if self.swarm_epoch is None or self.swarm_epoch == self._tried_at_epoch:
            return False
        return self.swarm_epoch >= (self.stored_epoch or 0) + self.options.checkpoint_every

    def _download(self, why: str) -> bool:
        try:
            newer = self.state.download()
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
                         commit_message=f"Collaborative epoch {epoch} of run {self.strategy.run_id}")
        except (PushError, UserError) as exc:  # the swarm goes on; the next upload tries again
            print(f"[convmodel] upload of collaborative epoch {epoch} failed: {user_message(exc) or exc}",
                  file=sys.stderr, flush=True)
            return
        self.uploaded_epoch = epoch

    def _assist(self) -> None:
        while not self._assist_stop.wait(self.options.assist_every):
            try:
                self.state.assist()
            except Exception as exc:  # a failed round must not end the assistance
                print(f"[convmodel] assisting in averaging: {type(exc).__name__}: {exc}", file=sys.stderr,
                      flush=True)

    # ---- leaving -----------------------------------------------------------------------------

    def _catch_signals(self) -> None:
        """SIGINT/SIGTERM: finish what is running, write the last checkpoint, leave; a second one stops at once.

        Installed after the DHT and averagers started: hivemind sets SIGINT to "ignore" before it forks.
        """
        def on_signal(signum, frame):
            if self.stop.is_set():
                for number, previous in self._previous_handlers.items():
                    signal.signal(number, previous)
                raise KeyboardInterrupt
            self.stop.set()
            print(f"[convmodel] {signal.Signals(signum).name}: writing the last checkpoint and leaving the swarm "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[number] = signal.getsignal(number)
            signal.signal(number, on_signal)

    def _final_checkpoint(self) -> None:
        if self.store is None:
            return
        if self.alive_peers and self.swarm_epoch is not None and self.swarm_epoch > (self.state.epoch or 0):
            self._download("last checkpoint")
        self._store()

    def leave(self) -> None:
        self._assist_stop.set()
        if self._assist_thread is not None:
            self._assist_thread.join()
        if self.monitor is not None:
            self.monitor.close()
        if self.state is not None:
            self.state.shutdown()
        joined = self.strategy.dht is not None
        self.strategy.teardown()
        for number, previous in self._previous_handlers.items():
            signal.signal(number, previous)
        if joined:
            print("[convmodel] auxiliary peer stopped", flush=True)


def _module_optimizer(module):
    """The module's optimizer and LambdaLR from configure_optimizers (one of each, as HivemindStrategy needs)."""
    configured = module.configure_optimizers()
    if isinstance(configured, dict):
        optimizer = configured["optimizer"]
        scheduler = configured.get("lr_scheduler")
        if isinstance(scheduler, dict):
            scheduler = scheduler.get("scheduler")
        return optimizer, scheduler
    return configured, None


def _has_config(argv: list[str]) -> bool:
    return any(arg in ("-c", "--config") or arg.startswith("--config=") for arg in argv)


def build_aux_peer(argv: list[str]) -> AuxiliaryPeer:
    """Parse the trainers' YAML and our options into an AuxiliaryPeer (nothing joins the swarm yet)."""
    from convmodel.collaborative.strategy import HivemindStrategy

    if not _has_config(argv):
        raise UserError("--config is required: the YAML the trainers use (its trainer.strategy is a "
                        "HivemindStrategy), e.g. --config configs/collaborative/bert-tiny.yaml")
    # we pass the arguments ourselves; Lightning warns when sys.argv is also set
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = AuxPeerCLI(args=argv, run=False)
    strategy = cli.trainer.strategy
    if not isinstance(strategy, HivemindStrategy):
        raise UserError(f"--config: trainer.strategy is {type(strategy).__name__}, not "
                        "convmodel.collaborative.HivemindStrategy; the auxiliary peer joins a swarm, so give a "
                        "collaborative config (configs/collaborative/*.yaml)")
    options = AuxPeerOptions.from_config(cli.config)
    options.check(strategy)
    return AuxiliaryPeer(cli.model, cli.trainer, cli.datamodule, options)


def main(argv: list[str] | None = None) -> None:
    """`run_aux_peer.py --config X.yaml [options]`; a user mistake ends with one `error:` line, exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(AuxPeerOptions.help_text())
        sys.exit(0)
    enable_docstring_help()
    try:
        exit_on_user_error(lambda: build_aux_peer(argv).run())
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM: stopped at once, nothing more to say
        sys.exit(130)
