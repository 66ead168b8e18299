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

A DiLoCo run (`algorithm: diloco`) shares its outer state, not an optimizer's: the auxiliary peer
stores, serves and exports that (diloco_held_state.py); it does not take part in rounds.

This module is the command line (options, parsing, main); the loop is aux_loop.py, the held
state held_state.py, and the swarm session is a SwarmPeer as in a trainer.
"""

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass, field

from convmodel.cli import ConvmodelCLI, enable_docstring_help, exit_on_user_error
from convmodel.collaborative.aux_loop import AuxiliaryPeer
from convmodel.errors import UserError


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

    def check(self, swarm_options) -> None:
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
        if self.assist_in_averaging and swarm_options.algorithm == "diloco":
            problems.append("--assist_in_averaging: under algorithm diloco the auxiliary peer does not take part in "
                            "the rounds (a DiLoCo round needs two training peers that accept connections, or one "
                            "and client-mode partners); leave out --assist_in_averaging")
        elif self.assist_in_averaging and swarm_options.client_mode:
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
    options.check(strategy.options)
    # the strategy object only carries the swarm's options here: the aux peer's SwarmPeer joins, not Lightning
    return AuxiliaryPeer(cli.model, cli.trainer, cli.datamodule, options, strategy.options)


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
