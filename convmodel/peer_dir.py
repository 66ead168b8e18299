"""`--peer_dir DIR`: one option that makes a second (third, ...) swarm peer on the same machine.

The collaborative configs are written for the first peer: its logs and checkpoints go to the
logger's save_dir and it writes its join address to `trainer.strategy.init_args.peers_file`.
Another peer started from the same config in the same folder would write into the first peer's
files and start a swarm of its own. Joining took four overrides (initial_peers, peers_file, the
logger's save_dir, and a callback's dirpath where one is set); `--peer_dir DIR` derives them all
from the parsed config before any class is built:

- this peer's logs go to DIR (the logger's save_dir) and its checkpoints to DIR/checkpoints (the
  configs' RunCheckpoint follows the logger; a callback with its own dirpath is moved there too),
  so `fit --peer_dir DIR --ckpt_path last` resumes this peer's own last.ckpt;
- it writes its own join address to DIR/peers.txt, which another peer can pass as initial_peers;
- an identity_path in the config (or on the command line copied from the first peer's) moves into
  DIR too: two processes with one peer id cannot both be in the swarm;
- `fit` joins the addresses in the config's peers_file (the first peer's) unless initial_peers
  (or $CONVMODEL_INITIAL_PEERS) says whom to join; `validate` and `test` start no swarm, so they
  only look in DIR.

It works on the jsonargparse Namespace by option names, so that the command line does not
import the swarm's code (convmodel/collaborative/ stays free of the CLI, and the CLI of it).
"""

from __future__ import annotations

import os

from convmodel.errors import UserError

OPTION = "--peer_dir"
PEERS_FILE = "peers.txt"
CHECKPOINTS = "checkpoints"
STRATEGY = "trainer.strategy.init_args"
#: read by convmodel.collaborative.dht when initial_peers is empty; named here, not imported
INITIAL_PEERS_ENV = "CONVMODEL_INITIAL_PEERS"


def apply_peer_dir(config, subcommand: str | None) -> None:
    """Rewrite `config` (one subcommand's Namespace) for a peer whose own files live in its `peer_dir`.

    Does nothing without the option. The option is set back to None afterwards, so the config
    saved beside the logs holds the derived paths and replays this peer without re-deriving them.
    """
    peer_dir = config.get("peer_dir")
    if not peer_dir:
        return
    strategy = config.get("trainer.strategy")
    init_args = strategy.get("init_args") if hasattr(strategy, "get") else None
    if init_args is None or "peers_file" not in init_args or "initial_peers" not in init_args:
        shown = strategy.get("class_path") if hasattr(strategy, "get") else strategy
        raise UserError(f"{OPTION} {peer_dir}: it makes another peer of a swarm, but trainer.strategy is {shown!r}, "
                        "not convmodel.collaborative.HivemindStrategy; use a config from configs/collaborative/ "
                        f"(or leave out {OPTION} and set --trainer.logger.init_args.save_dir to train alone)")
    first_peers_file = init_args.get("peers_file")
    own_peers_file = os.path.join(peer_dir, PEERS_FILE)
    if first_peers_file and os.path.realpath(first_peers_file) == os.path.realpath(own_peers_file):
        raise UserError(f"{OPTION} {peer_dir} is the first peer's folder ({STRATEGY}.peers_file is "
                        f"{first_peers_file}); start the first peer without {OPTION}, and every other peer with "
                        f"a folder of its own (e.g. {OPTION} {os.path.normpath(peer_dir)}-peer2)")
    joins = subcommand in (None, "fit") and not init_args.get("initial_peers") and not os.environ.get(INITIAL_PEERS_ENV)
    if joins:
        init_args.initial_peers = read_peers_file(first_peers_file)
    set_logger_save_dir(config, peer_dir)
    move_checkpoint_dirpaths(config, os.path.join(peer_dir, CHECKPOINTS))
    init_args.peers_file = own_peers_file
    if init_args.get("identity_path"):
        init_args.identity_path = os.path.join(peer_dir, os.path.basename(init_args.identity_path))
    config.peer_dir = None


def read_peers_file(path: str | None) -> list[str]:
    """The first peer's addresses, one a line, as its strategy wrote them; a UserError when there are none."""
    join_instead = (f"or pass the addresses it printed: --{STRATEGY}.initial_peers '[/ip4/.../p2p/...]' "
                    f"(\"$(cat OTHER_PEER_DIR/{PEERS_FILE})\" joins through any running peer)")
    if not path:
        raise UserError(f"{OPTION}: this config sets no {STRATEGY}.peers_file, so there is no file to find the "
                        f"first peer's address in; {join_instead}")
    try:
        with open(path, encoding="utf-8") as f:
            addresses = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        addresses = None
    if not addresses:
        state = "does not exist" if addresses is None else "is empty"
        raise UserError(f"{OPTION}: the first peer's address file {path} ({STRATEGY}.peers_file, relative to "
                        f"{os.getcwd()}) {state}; start the first peer first (the same command without "
                        f"{OPTION}, in this folder; it writes the file once it is up), {join_instead}")
    return addresses


def set_logger_save_dir(config, peer_dir: str) -> None:
    """Every configured logger writes under `peer_dir`; without one there is no folder to move."""
    loggers = config.get("trainer.logger")
    loggers = loggers if isinstance(loggers, list) else [loggers]
    moved = 0
    for logger in loggers:
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None and "save_dir" in init_args:
            init_args.save_dir = peer_dir
            moved += 1
    if not moved:
        raise UserError(f"{OPTION} {peer_dir}: trainer.logger has no save_dir to put this peer's logs and checkpoints "
                        "in; configure a logger as the configs in configs/collaborative/ do (TensorBoardLogger)")


def move_checkpoint_dirpaths(config, checkpoints: str) -> None:
    """A callback with an explicit dirpath would share it with every peer in this folder: move it to `checkpoints`."""
    callbacks = config.get("trainer.callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        init_args = callback.get("init_args") if hasattr(callback, "get") else None
        if init_args is not None and init_args.get("dirpath") is not None:
            init_args.dirpath = checkpoints
