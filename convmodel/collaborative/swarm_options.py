"""The swarm's options (run id, addresses, timings, hivemind.Optimizer switches) and their checks.

The trainer's HivemindStrategy and the auxiliary peer read the same `trainer.strategy.init_args`
section; both hand it to a SwarmPeer as one SwarmOptions. The checks gather every problem into
one UserError, and run when a peer starts, not when jsonargparse builds the strategy: an error
raised there comes back wrapped in a long Union message.
"""

from dataclasses import dataclass
from typing import NamedTuple

from convmodel.collaborative.compression import COMPRESSION_NAMES
from convmodel.errors import UserError

OPTION = "trainer.strategy.init_args"
#: synchronous: average gradients every target_batch_size samples; diloco: average pseudo-gradients every
#: inner_steps local optimizer steps (diloco.py)
ALGORITHMS = ("synchronous", "diloco")
#: where a peer listens unless host_maddrs says otherwise: only this machine can reach it
DEFAULT_HOST_MADDRS = ["/ip4/127.0.0.1/tcp/0"]


class SwarmAddresses(NamedTuple):
    """The addresses of the options, parsed and checked (initial peers also from the environment)."""

    initial_peers: list[str]
    host_maddrs: list[str]
    announce_maddrs: list[str] | None


@dataclass
class SwarmOptions:
    """Every option of a swarm peer; their meaning is documented on HivemindStrategy's arguments."""

    run_id: str = "convmodel"
    target_batch_size: int = 4096
    initial_peers: list[str] | str | None = None
    host_maddrs: list[str] | None = None
    announce_maddrs: list[str] | None = None
    identity_path: str | None = None
    client_mode: bool = False
    use_ipfs: bool = False
    use_relay: bool = True
    use_auto_relay: bool = False
    nat_port_map: bool = True
    auto_nat: bool = True
    matchmaking_time: float = 5.0
    averaging_timeout: float = 60.0
    load_state_timeout: float = 600.0
    next_chunk_timeout: float | None = None
    bootstrap_timeout: float = 30.0
    metadata_expiration: float = 60.0
    grad_compression: str = "fp16"
    state_averaging_compression: str = "fp16"
    offload_optimizer: bool = False
    delay_optimizer_step: bool = False
    delay_grad_averaging: bool = False
    delay_state_averaging: bool = True
    average_state_every: int = 1
    reuse_grad_buffers: bool = False
    bandwidth: float | None = None
    max_collaborative_epochs: int | None = None
    backup_every_epochs: int = 10
    peers_file: str | None = None
    verbose: bool = False
    resume_ahead_of_swarm: bool = False
    allowed_peers: list[str] | None = None
    owner_public_key: str | None = None
    access_token: str | None = None
    status_file: str | None = None
    algorithm: str = "synchronous"
    inner_steps: int = 50
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    pseudo_gradient_compression: str = "fp16"
    target_group_size: int | None = None

    @property
    def request_timeout(self) -> float:
        """Seconds an averager waits for a peer's answer: matchmaking warns (and may stall) when a
        request can outlive the matchmaking window."""
        return max(0.2, min(3.0, self.matchmaking_time / 2))

    def check(self) -> SwarmAddresses:
        """Check every option at once and resolve the addresses; one UserError lists all problems."""
        from convmodel.collaborative.dht import check_multiaddrs, parse_peer_list, resolve_initial_peers

        problems = self._problems()
        if problems:
            raise UserError(f"{OPTION}: " + "; ".join(problems))
        host = parse_peer_list(self.host_maddrs, f"{OPTION}.host_maddrs") or DEFAULT_HOST_MADDRS
        announce = parse_peer_list(self.announce_maddrs, f"{OPTION}.announce_maddrs")
        return SwarmAddresses(
            initial_peers=resolve_initial_peers(self.initial_peers),
            host_maddrs=check_multiaddrs(host, f"{OPTION}.host_maddrs", need_peer_id=False),
            announce_maddrs=check_multiaddrs(announce, f"{OPTION}.announce_maddrs", need_peer_id=False) or None)

    def _problems(self) -> list[str]:
        problems = []
        run_id = self.run_id
        if not isinstance(run_id, str) or not run_id.strip():
            problems.append("run_id must be a non-empty name")
        elif "." in run_id or any(c.isspace() for c in run_id):
            problems.append(f"run_id {run_id!r} must not contain dots or spaces (hivemind uses dots in DHT keys); "
                            f"e.g. {run_id.replace('.', '_').replace(' ', '_')!r}")
        for name, low in (("target_batch_size", 1), ("average_state_every", 1), ("backup_every_epochs", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("matchmaking_time", "averaging_timeout", "load_state_timeout", "bootstrap_timeout",
                     "metadata_expiration", "next_chunk_timeout", "bandwidth"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                problems.append(f"{name} must be > 0, got {value!r}")
        for name in ("grad_compression", "state_averaging_compression"):
            value = getattr(self, name)
            if value not in COMPRESSION_NAMES:
                problems.append(f"{name} must be one of {', '.join(COMPRESSION_NAMES)}, got {value!r}")
        if self.delay_optimizer_step and not self.offload_optimizer:
            problems.append("delay_optimizer_step needs offload_optimizer: true")
        if self.delay_optimizer_step and not self.delay_state_averaging:
            # hivemind asserts this at the first collaborative step, inside its background thread
            problems.append("delay_optimizer_step needs delay_state_averaging: true")
        if self.delay_grad_averaging and not self.delay_optimizer_step:
            problems.append("delay_grad_averaging needs delay_optimizer_step: true")
        problems += self._diloco_problems()
        if self.max_collaborative_epochs is not None and self.max_collaborative_epochs < 1:
            problems.append(f"max_collaborative_epochs must be >= 1, got {self.max_collaborative_epochs!r}")
        from convmodel.collaborative.access.policy import access_problems

        return problems + access_problems(self, OPTION)

    def _diloco_problems(self) -> list[str]:
        if self.algorithm not in ALGORITHMS:
            return [f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"]
        if self.algorithm != "diloco":
            return []
        problems = []
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            problems.append(f"inner_steps must be an integer >= 1, got {self.inner_steps!r}")
        if not self.outer_lr > 0 or not 0 <= self.outer_momentum < 1:
            problems.append(f"outer_lr must be > 0 and outer_momentum in [0, 1), got {self.outer_lr!r} and "
                            f"{self.outer_momentum!r}")
        if self.target_group_size is not None and (isinstance(self.target_group_size, bool) or not isinstance(
                self.target_group_size, int) or self.target_group_size < 2):
            problems.append(f"target_group_size must be an integer >= 2 or null, got {self.target_group_size!r}")
        if self.pseudo_gradient_compression not in COMPRESSION_NAMES:
            problems.append(f"pseudo_gradient_compression must be one of {', '.join(COMPRESSION_NAMES)}, got "
                            f"{self.pseudo_gradient_compression!r}")
        if not self.averaging_timeout > self.matchmaking_time > self.request_timeout:
            problems.append(f"algorithm diloco needs averaging_timeout > matchmaking_time > {self.request_timeout:g} s "
                            f"(the request timeout), got {self.averaging_timeout!r} and {self.matchmaking_time!r}")
        # the inner optimizer is the module's own, stepped by Lightning: hivemind.Optimizer's switches do not apply
        for name in ("offload_optimizer", "delay_optimizer_step", "delay_grad_averaging", "reuse_grad_buffers"):
            if getattr(self, name):
                problems.append(f"{name} is an option of algorithm synchronous; algorithm diloco steps the module's "
                                "own optimizer every batch: remove it")
        return problems
