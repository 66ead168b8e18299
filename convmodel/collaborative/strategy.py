"""HivemindStrategy: the same LightningModule trains alone or in a hivemind swarm.

Swapping `trainer.strategy` for this class is the whole difference. The strategy is the
Lightning side only: it checks that the trainer fits a swarm (one machine; several devices there
train as local ranks of one peer, rank_strategy.py), hands 16-mixed's loss
scaler (loss_scaling.py) and the module's own optimizer and schedule (`configure_optimizers`) to
a SwarmPeer (swarm_peer.py: DHT, hivemind.Optimizer, joining, the NaN guard, the epoch report) at
`setup_optimizers`, joins the swarm's state before the first step, counts each batch's samples,
and leaves in `teardown`.

`algorithm: diloco` swaps the SwarmPeer for a DiLoCoPeer (diloco_peer.py): Lightning then steps the
module's optimizer and schedule every batch as in a local run, and every `inner_steps` of them the
peers average their pseudo-gradients and take one outer step.
"""

import signal
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Literal

import torch
from pytorch_lightning.strategies import SingleDeviceStrategy, StrategyRegistry
from pytorch_lightning.trainer import call
from pytorch_lightning.utilities.data import extract_batch_size
from typing_extensions import override

from convmodel.collaborative.compression import CompressionName
from convmodel.collaborative.diloco_peer import DiLoCoPeer
from convmodel.collaborative.local_ranks import ParameterVersion
from convmodel.collaborative.loss_scaling import swarm_loss_scaler
from convmodel.collaborative.optimizer_rebuild import rebuild_optimizer
from convmodel.collaborative.rank_strategy import LocalRanksMixin
from convmodel.collaborative.run_identity import check_checkpoint_run, record_run
from convmodel.collaborative.signals import StopOnSignal, restore_handlers
from convmodel.collaborative.swarm_options import SwarmOptions
from convmodel.collaborative.swarm_peer import SwarmPeer
from convmodel.errors import UserError

__all__ = ["HivemindStrategy", "rebuild_optimizer"]  # rebuild_optimizer: imported from here by older code


class HivemindStrategy(LocalRanksMixin, SingleDeviceStrategy):
    """Train in a hivemind swarm: peers average gradients until they have `target_batch_size` samples.

    Args:
        run_id: Name of the training run; peers with the same run_id train together (no dots).
        target_batch_size: Samples the whole swarm accumulates per optimizer step (collaborative epoch).
        initial_peers: Multiaddrs of running peers to join (a list or one string); default
            $CONVMODEL_INITIAL_PEERS; none starts a new swarm.
        host_maddrs: Multiaddrs this peer listens on (tcp/0 picks a free port); default /ip4/127.0.0.1/tcp/0,
            this machine only: a swarm across machines says /ip4/0.0.0.0/tcp/PORT.
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
        resume_ahead_of_swarm: Let a peer resumed from a checkpoint further along than every live peer join
            (the swarm then continues from this checkpoint); refused by default (run_identity.py).
        allowed_peers: Peer ids admitted to this private swarm (python trainer/peer_id.py prints one); every
            other peer's DHT and averaging requests are refused unless it holds an access token.
        owner_public_key: The run owner's public key (.pub file or its ssh-rsa line): peers holding a token it
            signed are admitted (README, Private swarms).
        access_token: File with this peer's token from the run's owner (python trainer/issue_token.py);
            needs identity_path and owner_public_key.
        status_file: JSON file this peer rewrites while it is in the swarm (epoch, peers seen), for a container's
            health check (convmodel/health.py); default $CONVMODEL_STATUS_FILE; none writes no file.
        algorithm: synchronous (average gradients every target_batch_size samples of the swarm) or diloco
            (each peer takes inner_steps steps of the module's own optimizer, then the peers average the change
            and take one outer Nesterov step: far less traffic, for slow links; README, Slow links).
        inner_steps: diloco: local optimizer steps per round (H); max_collaborative_epochs counts rounds.
        outer_lr: diloco: learning rate of the outer Nesterov SGD (0.7 in the DiLoCo paper).
        outer_momentum: diloco: momentum of the outer SGD (0.9 in the paper).
        pseudo_gradient_compression: diloco: compression of the averaged pseudo-gradients (same choices).
        target_group_size: diloco: a round's group starts averaging as soon as this many peers are in it, instead
            of after matchmaking_time (a swarm of known size); null waits matchmaking_time every round.
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
        resume_ahead_of_swarm: bool = False,
        allowed_peers: list[str] | None = None,
        owner_public_key: str | None = None,
        access_token: str | None = None,
        status_file: str | None = None,
        algorithm: Literal["synchronous", "diloco"] = "synchronous",
        inner_steps: int = 50,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        pseudo_gradient_compression: CompressionName = "fp16",
        target_group_size: int | None = None,
    ):
        super().__init__(device="cpu")
        # filled in by Lightning's accelerator connector from trainer.accelerator/devices (and the cluster
        # environment, read with several devices: rank_strategy.py)
        self.parallel_devices: list[torch.device] | None = None
        self.cluster_environment = None
        self.ranks = None  # LocalRanks, with several devices once the process group is up (local_ranks.py)
        self._version: ParameterVersion | None = None  # rank 0 of several: when to send the parameters
        self._stop_asked = False  # several devices: a signal asks; the ranks stop together at a step's end
        given = locals()
        self.options = SwarmOptions(**{option.name: given[option.name] for option in fields(SwarmOptions)})
        self.diloco = algorithm == "diloco"
        self.peer = DiLoCoPeer(self.options) if self.diloco else SwarmPeer(self.options)
        self._samples_since_step = 0
        self._non_finite_loss = False
        self._stop_on_signal = StopOnSignal((signal.SIGINT, signal.SIGTERM), self._on_signal)
        self._stop_at_once = False  # a second Ctrl-C or SIGTERM: no goodbye
        #: the swarm reached max_collaborative_epochs (read by convmodel.fit_summary: a finished run, not a stopped one)
        self.end_reached: str | None = None

    @property
    def steps_schedule_itself(self) -> bool:
        """Synchronous: the schedule counts collaborative epochs, not local batches (convmodel.cli skips its
        max_steps check). DiLoCo: Lightning steps it every batch, as in a local run."""
        return not self.diloco

    @property
    def hivemind_optimizer(self):
        """The hivemind.Optimizer, once `setup_optimizers` joined the swarm (None before and after)."""
        return self.peer.optimizer

    @property
    def dht(self):
        return self.peer.dht

    # ---- devices ------------------------------------------------------------------------------

    @override
    def setup_environment(self) -> None:
        self.options.check()  # every option problem in one message, before anything starts
        if self.several_devices:
            self.start_ranks(self.options)
        super().setup_environment()

    @override
    def setup(self, trainer) -> None:
        if trainer.num_nodes > 1:
            raise UserError("trainer.num_nodes: HivemindStrategy runs one peer per process; set trainer.num_nodes: 1 "
                            "and start a peer on each machine with initial_peers")
        scaler = getattr(self.precision_plugin, "scaler", None)
        if self.diloco:  # the inner steps are a local run's: Lightning's scaler, bf16 weights copied to fp32 outer ones
            super().setup(trainer)
            return
        if scaler is not None:  # 16-mixed: unscaled before hivemind accumulates a step (loss_scaling.py)
            self.peer.loss_scaler = swarm_loss_scaler(self.precision_plugin, self.options)
        if getattr(self.precision_plugin, "precision", None) == "bf16-true":
            # hivemind's fp16 compression and its uncompressed format refuse bfloat16 tensors
            raise UserError("trainer.precision: bf16-true keeps parameters and gradients in bfloat16, which "
                            "hivemind cannot send, so every averaging round would fail; use precision: "
                            "bf16-mixed (bfloat16 compute, fp32 parameters and gradients)")
        super().setup(trainer)

    # ---- joining -------------------------------------------------------------------------------

    @override
    def setup_optimizers(self, trainer) -> None:
        super().setup_optimizers(trainer)  # the module's configure_optimizers: one optimizer, one schedule
        if self.diloco:
            self._join_diloco()
            return
        if self.ranks is not None and not self.ranks.is_main:  # its optimizer is never stepped: rank 0 steps the swarm
            self._stop_on_signal.install(previous={number: signal.getsignal(number)
                                                   for number in self._stop_on_signal.signals})
            self.lr_scheduler_configs = []
            return
        if len(self.optimizers) != 1:
            raise UserError(f"HivemindStrategy needs exactly one optimizer from configure_optimizers, got "
                            f"{len(self.optimizers)}")
        scheduler = self.lr_scheduler_configs[0].scheduler if self.lr_scheduler_configs else None
        clip_algorithm = str(trainer.gradient_clip_algorithm or "norm")
        # hivemind sets SIGINT to "ignore" in this process
        before = {number: signal.getsignal(number) for number in self._stop_on_signal.signals}
        try:
            self.peer.join(self.optimizers[0], scheduler, trainer.gradient_clip_val, clip_algorithm,
                           module=self.lightning_module)
        finally:
            if self.peer.optimizer is not None:
                self._stop_on_signal.install(previous=before)
            else:
                restore_handlers(before)  # a failed start: Ctrl-C as it was
        # hivemind steps the schedule once per collaborative epoch; Lightning must not step it per batch
        self.optimizers = [self.peer.optimizer]
        self.lr_scheduler_configs = []
        if self.ranks is not None:
            self._version = ParameterVersion(self.peer)

    def _join_diloco(self) -> None:
        """The module's optimizer and schedule stay Lightning's (the inner ones); the peer adds the outer loop."""
        before = {number: signal.getsignal(number) for number in self._stop_on_signal.signals}
        try:
            self.peer.join(self.lightning_module.parameters())
        finally:
            if self.peer.optimizer is not None:
                self._stop_on_signal.install(previous=before)
            else:
                restore_handlers(before)

    def _on_signal(self, signum) -> bool:
        """The first Ctrl-C or SIGTERM asks the trainer to stop after this step (see signals.py).

        The run then ends as one that reached max_steps: RunCheckpoint writes last.ckpt (after the
        step's delayed updates landed), the summary prints how to resume, the teardown says goodbye
        (the others stop counting this peer within a round) and the exit status is 0. Ending through
        Lightning's interrupt path instead left the goodbye unfinished: the DHT was terminated the hard
        way and the others kept counting the peer until its report expired.
        """
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None:
            return False
        if self.ranks is None:
            trainer.should_stop = True
        else:  # every rank got it, each at its own moment: they agree at a step's end (local_ranks.py)
            self._stop_asked = True
            if not self.ranks.is_main:
                return True
        name, again = ("Ctrl-C", "Ctrl-C again") if signum == signal.SIGINT else (signal.Signals(signum).name,
                                                                                  "a second signal")
        print(f"[convmodel] {name}: leaving the swarm after this step ({again} to stop at once)",
              file=sys.stderr, flush=True)
        return True

    @override
    def on_exception(self, exception: BaseException) -> None:
        """A second signal inside a hivemind call: leave without a goodbye (a lock may be held mid-call)."""
        if isinstance(exception, KeyboardInterrupt):
            self._stop_at_once = True

    @override
    def load_optimizer_state_dict(self, checkpoint) -> None:
        check_checkpoint_run(checkpoint, self.options.run_id)
        if self.ranks is not None and not self.ranks.is_main:
            return  # the swarm's optimizer state is rank 0's; this rank's optimizer is never stepped
        super().load_optimizer_state_dict(checkpoint)
        if self.diloco:
            self.peer.load_state_dict(checkpoint.get("diloco"))
        else:
            self.peer.after_checkpoint_load()

    @override
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if self.peer.optimizer is not None and self.diloco:
            record_run(checkpoint, self.options.run_id, self.peer.optimizer.round)
            checkpoint["diloco"] = self.peer.state_dict()
        elif self.peer.optimizer is not None:
            record_run(checkpoint, self.options.run_id, self.peer.optimizer.local_epoch)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        # Lightning's signal connector wrapped SIGTERM at the start of fit (its handler ends the run through
        # the interrupt path: exit 143, the goodbye cut short); a SIGTERM is a Ctrl-C here
        self._stop_on_signal.take_back()
        if self.peer.optimizer is not None and self.diloco:
            self.peer.catch_up(self.lr_scheduler_configs[0].scheduler if self.lr_scheduler_configs else None)
        elif self.peer.optimizer is not None:
            self.peer.catch_up()
        if self.ranks is not None:
            self._sync_parameters(force=True)  # every rank starts from rank 0's parameters (its download included)

    # ---- stepping ------------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any):
        if self.ranks is not None:
            self._sync_parameters()  # what changed on rank 0 since the last step (a checkpoint's wait) arrives first
        output = super().training_step(*args, **kwargs)
        if self.peer.optimizer is None and self.ranks is None:
            return output
        batch = args[0] if args else kwargs.get("batch")
        try:
            self._samples_since_step += int(extract_batch_size(batch))
        except Exception:  # a batch Lightning cannot measure counts as one sample
            self._samples_since_step += 1
        loss = output["loss"] if isinstance(output, dict) else output
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            self._non_finite_loss = True
        elif isinstance(loss, torch.Tensor) and self.diloco:
            self.peer.add_loss(loss)
        elif isinstance(loss, torch.Tensor) and self.peer.report is not None:
            self.peer.report.add_loss(loss)
        if self.peer.optimizer is None:
            return output
        module = self.lightning_module
        for name, value in self.peer.metrics().items():
            module.log(name, value, on_step=True, on_epoch=False, batch_size=1,
                       prog_bar=name in ("collab/epoch", "collab/peers"))
        return output

    @override
    def optimizer_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        if self.ranks is not None:
            return self._ranks_step(optimizer, closure)
        if self.peer.optimizer is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.diloco:
            return self._inner_step(optimizer, closure, model, **kwargs)
        # run forward/backward ourselves: Lightning's precision plugin would clip each local
        # gradient, and clipping belongs to the swarm's averaged gradient (see optimizer_rebuild.py)
        closure_result = closure()
        overflow = self.peer.unscale_gradients()  # 16-mixed: the hooks below see unscaled gradients, as in Lightning
        trainer = self.lightning_module.trainer
        call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
        call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
        samples, self._samples_since_step = self._samples_since_step, 0
        loss_finite, self._non_finite_loss = not self._non_finite_loss, False
        if self.peer.step(samples, loss_finite, overflow):
            trainer.should_stop = True
            last = self.options.max_collaborative_epochs
            self.end_reached = f"collaborative epoch {last} (trainer.strategy.init_args.max_collaborative_epochs)"
        return closure_result

    def _ranks_step(self, optimizer, closure: Callable[[], Any]) -> Any:
        """One local step of a peer with several devices (local_ranks.py): average the ranks' gradients, agree on
        samples, non-finite losses and stopping, rank 0 steps the swarm, changed parameters go to every rank."""
        closure_result = closure()
        module, ranks, scaler = self.lightning_module, self.ranks, self.peer.loss_scaler
        trainer = module.trainer
        params = [p for p in module.parameters() if p.requires_grad]
        ranks.average_gradients(params)
        overflow = scaler.overflowed_params(params) if scaler is not None else False  # alike: the same gradients
        call._call_callback_hooks(trainer, "on_before_optimizer_step", optimizer)
        call._call_lightning_module_hook(trainer, "on_before_optimizer_step", optimizer)
        samples, non_finite, stop = ranks.agree(self._samples_since_step, self._non_finite_loss,
                                                self._stop_asked or trainer.should_stop)
        self._samples_since_step, self._non_finite_loss = 0, False
        finished = False
        if ranks.is_main:
            finished = self.peer.step(samples, not non_finite, overflow)
        elif scaler is not None:
            scaler.update(overflowed=overflow and not non_finite, announce=False)
        finished, stop = self._sync_parameters(False, finished, stop or finished)
        if stop:
            trainer.should_stop = True
        if finished:
            last = self.options.max_collaborative_epochs
            self.end_reached = f"collaborative epoch {last} (trainer.strategy.init_args.max_collaborative_epochs)"
        return closure_result

    def _sync_parameters(self, force: bool = False, *flags: bool) -> list[bool]:
        """Rank 0 says whether its parameters changed (and `flags`); when they did, every rank takes them."""
        changed = self._version.changed() if self._version is not None else False
        changed, *flags = self.ranks.decide(changed or force, *flags)
        if changed:
            module = self.lightning_module
            self.ranks.broadcast_tensors([*module.parameters(), *module.buffers()])
        return flags

    def _inner_step(self, optimizer, closure: Callable[[], Any], model=None, **kwargs: Any) -> Any:
        """Lightning's own step (clipping and precision as in a local run), then DiLoCo's count of it."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        samples, self._samples_since_step = self._samples_since_step, 0
        self._non_finite_loss = False  # a non-finite pseudo-gradient is caught at the round's end
        self.peer.after_inner_step(samples, lr=optimizer.param_groups[0]["lr"])
        if self.peer.finished:
            self.lightning_module.trainer.should_stop = True
            last = self.options.max_collaborative_epochs
            self.end_reached = f"DiLoCo round {last} (trainer.strategy.init_args.max_collaborative_epochs)"
        return output

    @override
    def lightning_module_state_dict(self) -> dict:
        # a checkpoint starts here (parameters, then optimizer state): let hivemind's background optimizer
        # step finish and land first, so that it neither reads state being written nor misses the step.
        # Delayed state averaging alone writes only the averager's own buffers: no wait for it here
        if self.options.delay_optimizer_step:
            self.peer.finish_delayed_updates()
        return super().lightning_module_state_dict()

    # ---- leaving -----------------------------------------------------------------------------------

    @override
    def teardown(self) -> None:
        cut_short = False
        if self._stop_at_once:
            self.peer.stop_at_once()
        else:
            cut_short = self.peer.leave()  # bounded; a Ctrl-C while it waits stops at once
        self._stop_on_signal.restore()
        super().teardown()
        if self.ranks is not None:  # after fit the ranks go their own ways: no collective waits for another
            self.ranks = None
            self.cluster_environment.teardown()
        if cut_short:  # Lightning's interrupt path: RunCheckpoint says what last.ckpt holds, the CLI exits 130
            raise KeyboardInterrupt("Ctrl-C during the goodbye")

    @classmethod
    @override
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description=cls.__doc__.splitlines()[0],
                                   override=True)


HivemindStrategy.register_strategies(StrategyRegistry)
