"""`--peer_dir DIR`: a second and a third swarm peer on one machine with one option.

The config-level tests run the CLI's own parser and the `--peer_dir` hook on the parsed config
(no classes built, no peers); the swarm test starts three real trainer.py processes in one
folder, the first as the config's header prints it, the others with `--peer_dir` only.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_collaborative import REPO, STARTUP_S, Peer, peer_args, shards, wait_for_file  # noqa: F401

from convmodel.cli import ConvmodelCLI, exit_on_user_error, with_default_subcommand

# cli.main silences it too: we pass the arguments ourselves while pytest's are in sys.argv
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")
CONFIGS = REPO / "configs" / "collaborative"
BERT = CONFIGS / "bert-tiny.yaml"
FIRST_PEERS_FILE = Path("runs/bert-tiny-swarm/peers.txt")  # bert-tiny.yaml's peers_file
ADDRESS = "/ip4/127.0.0.1/tcp/31337/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"


class ParsedOnly(ConvmodelCLI):
    """The real CLI up to the classes: parse, `_parse_ckpt_path`, `before_instantiate_classes` (--peer_dir)."""

    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def parsed(args: list[str]):
    """The config of the command `trainer.py ARGS` as the trainer would build it (its subcommand's part)."""
    cli = ParsedOnly(args=with_default_subcommand(args))
    return cli.config[cli.config.subcommand]


def parse_error(args: list[str], capsys) -> str:
    """The one `error:` line `trainer.py ARGS` ends with (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        exit_on_user_error(lambda: parsed(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """A working folder that has the repository's configs/ (the headers' commands use relative paths)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONVMODEL_INITIAL_PEERS", raising=False)
    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    return tmp_path


def write_first_peers_file(path: Path = FIRST_PEERS_FILE, text: str = f"{ADDRESS}\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- the option's effect on the parsed config --------------------------------------------------------


def test_peer_dir_gives_the_peer_its_own_files_and_joins_the_first_peer(in_tmp):
    write_first_peers_file(text=f"{ADDRESS}\n{ADDRESS.replace('127.0.0.1', '10.0.0.2')}\n\n")
    config = parsed(["--config", str(BERT), "--peer_dir", "runs/bert-tiny-peer2"])
    strategy = config.trainer.strategy.init_args
    assert strategy.initial_peers == [ADDRESS, ADDRESS.replace("127.0.0.1", "10.0.0.2")]  # every line, none blank
    assert strategy.peers_file == "runs/bert-tiny-peer2/peers.txt"  # a third peer can join through this one
    assert config.trainer.logger.init_args.save_dir == "runs/bert-tiny-peer2"  # logs, and RunCheckpoint's folder
    assert config.trainer.callbacks[0].init_args.dirpath is None  # RunCheckpoint follows the logger
    assert config.peer_dir is None  # the saved config.yaml replays the derived paths, not the derivation
    # nothing else changes: the same swarm, model and data as the first peer
    first = parsed(["--config", str(BERT)])
    assert strategy.run_id == first.trainer.strategy.init_args.run_id
    assert config.model == first.model and config.data == first.data


def test_peer_dir_moves_an_explicit_checkpoint_dirpath_and_identity_into_it(in_tmp):
    write_first_peers_file()
    config = parsed(["--config", str(BERT), "--peer_dir", "runs/p2",
                     "--trainer.strategy.init_args.identity_path", "work/peer.id",
                     "--trainer.callbacks", '[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", '
                                            '"init_args": {"dirpath": "checkpoints"}}]'])
    assert config.trainer.callbacks[0].init_args.dirpath == "runs/p2/checkpoints"
    assert config.trainer.strategy.init_args.identity_path == "runs/p2/peer.id"  # two peers cannot share an id


def test_given_initial_peers_win_over_the_first_peers_file(in_tmp, monkeypatch):
    # no first peer's file at all: the addresses given are whom to join
    config = parsed(["--config", str(BERT), "--peer_dir", "runs/p3",
                     "--trainer.strategy.init_args.initial_peers", f"[{ADDRESS}]"])
    assert config.trainer.strategy.init_args.initial_peers == [ADDRESS]
    assert config.trainer.strategy.init_args.peers_file == "runs/p3/peers.txt"
    monkeypatch.setenv("CONVMODEL_INITIAL_PEERS", ADDRESS)  # the strategy reads it when initial_peers is empty
    assert parsed(["--config", str(BERT), "--peer_dir", "runs/p3"]).trainer.strategy.init_args.initial_peers is None


def test_test_and_validate_with_peer_dir_look_in_it_without_a_swarm(in_tmp):
    for subcommand in ("test", "validate"):
        config = parsed([subcommand, "--config", str(BERT), "--peer_dir", "runs/p2", "--ckpt_path", "last"])
        assert config.trainer.logger.init_args.save_dir == "runs/p2"
        assert config.trainer.strategy.init_args.initial_peers is None  # no first peer's file needed


# ---- one clear error each ------------------------------------------------------------------------------


def test_missing_first_peers_file_is_one_error_naming_it(in_tmp, capsys):
    err = parse_error(["--config", str(BERT), "--peer_dir", "runs/bert-tiny-peer2"], capsys)
    assert f"the first peer's address file {FIRST_PEERS_FILE} (trainer.strategy.init_args.peers_file" in err
    assert "does not exist; start the first peer first" in err and "--trainer.strategy.init_args.initial_peers" in err
    write_first_peers_file(text="\n")  # a file with no address in it is no better
    assert "is empty; start the first peer first" in parse_error(
        ["--config", str(BERT), "--peer_dir", "runs/bert-tiny-peer2"], capsys)


def test_config_without_peers_file_needs_initial_peers(in_tmp, capsys):
    err = parse_error(["--config", str(CONFIGS / "lean-albert-xlarge.yaml"), "--peer_dir", "runs/gpu1"], capsys)
    assert "sets no trainer.strategy.init_args.peers_file" in err and "initial_peers" in err


def test_peer_dir_without_a_hivemind_strategy_is_one_error(in_tmp, capsys):
    err = parse_error(["--config", str(REPO / "configs" / "bert-tiny.yaml"), "--peer_dir", "runs/p2"], capsys)
    assert "--peer_dir runs/p2" in err and "trainer.strategy is 'auto'" in err
    assert "convmodel.collaborative.HivemindStrategy" in err


def test_the_first_peers_own_folder_is_refused(in_tmp, capsys):
    write_first_peers_file()
    err = parse_error(["--config", str(BERT), "--peer_dir", "runs/bert-tiny-swarm/"], capsys)
    assert "is the first peer's folder" in err and "start the first peer without --peer_dir" in err


# ---- the configs' header commands parse as printed -----------------------------------------------------


def header_commands(config: Path) -> list[list[str]]:
    """The `python trainer/trainer.py ...` commands in the config's header comment, as a shell splits them."""
    header = []
    for line in config.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line[1:].strip())
    commands, current = [], ""
    for line in header:
        if current or "python trainer/trainer.py" in line:
            current += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                commands.append(shlex.split(current))
                current = ""
    return [c[c.index("trainer/trainer.py") + 1:] for c in commands]


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_header_commands_parse_as_printed(config, in_tmp):
    commands = header_commands(config)
    peer_dirs = [c[c.index("--peer_dir") + 1] for c in commands if "--peer_dir" in c]
    assert peer_dirs, f"{config.name}'s header shows no peer started with --peer_dir"
    peers_file = yaml.safe_load(config.read_text())["trainer"]["strategy"]["init_args"].get("peers_file")
    if peers_file:
        write_first_peers_file(Path(peers_file))  # as the first peer leaves it
    for args in commands:
        assert args[:2] == ["--config", f"configs/collaborative/{config.name}"], args
        parsed(args)  # exits 2 on an unknown option or a bad value
    if peers_file:
        assert len(peer_dirs) >= 2, "the header shows a second and a third peer"
        for peer_dir in peer_dirs:
            joiner = parsed(["--config", str(config), "--peer_dir", peer_dir])
            assert joiner.trainer.strategy.init_args.initial_peers == [ADDRESS]


def test_readme_joins_peers_with_peer_dir():
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Train together.*?```bash\n(.*?)```", text, re.S).group(1)
    assert "python trainer/trainer.py --config configs/collaborative/bert-tiny.yaml\n" in block
    for n in (2, 3):
        assert (f"python trainer/trainer.py --config configs/collaborative/bert-tiny.yaml --peer_dir "
                f"runs/bert-tiny-peer{n}") in block


# ---- three peers in one folder ------------------------------------------------------------------------


class PeerInFolder(Peer):
    """A trainer.py process started in a folder it shares with other peers (its log named after it)."""

    def __init__(self, folder: Path, name: str, args: list[str]):
        self.workdir, self.log_path = folder, folder / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        env.pop("CONVMODEL_INITIAL_PEERS", None)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, str(REPO / "trainer" / "trainer.py"), *args], cwd=folder,
                                        env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)


def shared_args(shards: Path, tokenizer_dir: str, **strategy) -> list[str]:  # noqa: F811
    """peer_args' tiny sizes with the config's own logger and RunCheckpoint (the folders --peer_dir moves)."""
    args, kept = peer_args(shards, tokenizer_dir, **strategy), []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--trainer.logger.init_args.save_dir", "--trainer.callbacks"):
            skip = True
        else:
            kept.append(arg)
    return kept


HOLD = '''
import os, time
from pytorch_lightning import Callback

class HoldAtFirstEpoch(Callback):
    """From collaborative epoch 1 on, wait until `go` exists, having said so in <logger save_dir>/holding.

    The test writes `go` once every peer holds, so that the three train together instead of one
    finishing the run alone while the others start. The marker sits in each peer's own folder.
    """

    def __init__(self, go: str):
        self.go = go

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.strategy.hivemind_optimizer
        if self.go is None or opt is None or opt.local_epoch < 1:
            return
        open(os.path.join(trainer.logger.save_dir, "holding"), "w").write(str(opt.local_epoch))
        while not os.path.exists(self.go):
            time.sleep(0.1)
        self.go = None
'''
LAST_EPOCH = 6
SWARM = dict(target_batch_size=128, max_collaborative_epochs=LAST_EPOCH, matchmaking_time=1.0,
             averaging_timeout=10.0, next_chunk_timeout=5.0)  # a round that waits for a lagging peer: 10 s at most
FOLDERS = ("bert-tiny-swarm", "bert-tiny-peer2", "bert-tiny-peer3")  # the first peer's (the config's), then ours


class CheckpointOnly(ConvmodelCLI):
    """The real CLI, everything but the training or testing: it finds and checks the checkpoint it would load."""

    def fit(self, model, **kwargs) -> None:
        pass

    def test(self, model, **kwargs) -> None:
        pass


@pytest.mark.timeout(400)
def test_second_and_third_peer_join_with_one_option(shards, tokenizer_dir, tmp_path, monkeypatch,  # noqa: F811
                                                    capsys):
    (tmp_path / "hold.py").write_text(HOLD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    go = tmp_path / "go"
    # every peer gets the same overrides: tiny sizes, and the hold (added to the config's RunCheckpoint)
    common = [*shared_args(shards, tokenizer_dir, **SWARM), "--trainer.callbacks+",
              json.dumps({"class_path": "hold.HoldAtFirstEpoch", "init_args": {"go": str(go)}})]
    folders = [tmp_path / "runs" / name for name in FOLDERS]
    peers = []
    try:
        # the first peer as the header starts it; the others, in the same folder, with --peer_dir only
        first = PeerInFolder(tmp_path, "first", common)
        peers.append(first)
        wait_for_file(tmp_path / FIRST_PEERS_FILE, first, STARTUP_S)
        for n in (2, 3):
            peers.append(PeerInFolder(tmp_path, f"peer{n}", [*common, "--peer_dir", f"runs/bert-tiny-peer{n}"]))
        for peer in peers[1:]:  # each found the first peer through its peers.txt and took the swarm's state
            peer.wait_for(r"joined run 'bert_tiny' at collaborative epoch \d+", STARTUP_S)
        for peer, folder in zip(peers, folders):
            wait_for_file(folder / "holding", peer, 60)
        go.write_text("")
        for peer in peers:
            assert peer.wait_exit(240) == 0, peer.output()[-4000:]
    finally:
        for peer in peers:
            peer.kill()
    outputs = [peer.output() for peer in peers]
    # each joiner reached the swarm through the one option: it downloaded the swarm's state from the address
    # in the first peer's file. That they then train as one swarm of 3 is test_collaborative_production's
    # check: here, on a loaded 2-core machine, a joiner's count of the swarm dropped for a while in 3 of 6 runs
    # and, in one fresh-clone run, one joiner trained alone to the end while the other two averaged (open bug)
    for out in outputs[1:]:
        assert re.search(r"joined run 'bert_tiny' at collaborative epoch \d+: downloaded the swarm's", out), out[-3000:]
    for folder, out in zip(folders, outputs):
        ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["optimizer_states"][0]["state"]["local_epoch"] == LAST_EPOCH
        assert (folder / "peers.txt").read_text().startswith("/ip4/127.0.0.1/tcp/")  # each can be joined through
        assert list(folder.glob("version_*/events.out.tfevents.*")), f"no TensorBoard log in {folder}"
        # the printed next command keeps the option: it tests this peer's own last.ckpt, and as `fit` resumes it
        command = shlex.split(re.search(r"^  test: +(.*)$", out, re.M).group(1))
        assert ("--peer_dir" in command) == (folder.name != "bert-tiny-swarm"), command
        monkeypatch.chdir(tmp_path)
        monkeypatch.syspath_prepend(str(tmp_path))  # hold.py, for the callback in the command
        own_last = os.path.realpath(folder / "checkpoints" / "last.ckpt")
        args = command[command.index("test") + 1:]
        assert os.path.realpath(CheckpointOnly(args=["test", *args]).config_init.test.ckpt_path) == own_last
        capsys.readouterr()
        CheckpointOnly(args=["fit", *args])
        assert f"from {own_last}" in capsys.readouterr().out
