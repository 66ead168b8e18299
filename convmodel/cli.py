"""The training command line: LightningCLI over PretrainingModule and JsonlDataModule.

`trainer.py --config configs/bert-tiny.yaml` trains (`fit` is implied); `trainer.py test
--config ... --ckpt_path last` evaluates. Every knob is a YAML key with its docstring in
`--help`, and `--print_config` shows the full resolved config.

Around Lightning's subcommands: `--ckpt_path` is checked first (convmodel.ckpt_path: `last` is
this run's last.ckpt, a broken file or a test without a checkpoint is one error line), a fresh
fit into another run's checkpoint folder is refused (`--overwrite_checkpoints true` replaces
it), a resume says where it starts (a finished run: "nothing to do", exit 0) and an ended
linear schedule is an error instead of steps at learning rate 0, fit ends with a
summary (convmodel.fit_summary), and Ctrl-C/SIGTERM save last.ckpt and print the resume
command (convmodel.run_checkpoint), exiting 130/143 like a process stopped by that signal.
`--peer_dir DIR` turns a swarm config's first peer into another peer with its own files
(convmodel.peer_dir), applied to the parsed config before any class is built.
"""

import os
import re
import shlex
import sys
import warnings

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from convmodel.errors import UserError, user_message

SUBCOMMANDS = ("fit", "validate", "test")
#: exit status after Ctrl-C / SIGTERM, as a shell reports a process stopped by that signal
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class ConvmodelArgumentParser(LightningArgumentParser):
    """Prints a config mistake as one `error:` message, without 60 lines of usage above it."""

    def error(self, message: str, ex: Exception | None = None):
        from jsonargparse._common import debug_mode_active

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {readable_parse_error(message)}\n(`{prog} --help` lists every option)\n")
        self.exit(2)


def readable_parse_error(message: str) -> str:
    """jsonargparse's message for a bad subclass section, without the Union-with-None detour.

    A model typo reads 'Does not validate against any of the Union subtypes ... Problem with
    given class_path X: Option 'lrr' is not accepted ... Expected a NoneType'; the user needs
    the middle only.
    """
    match = re.search(
        r'Parser key "([^"]+)":.*?Problem with given class_path \'([^\']+)\':\n(.*?)\n\s*- Expected a <class \'NoneType\'>',
        message,
        re.S,
    )
    if not match:
        return message
    key, class_path, detail = match.groups()
    return f"{key} ({class_path}): " + " ".join(line.strip() for line in detail.splitlines() if line.strip())


class ConvmodelCLI(LightningCLI):
    """LightningCLI with our model base class, our data module and the links between them.

    The model is chosen by `model.class_path` (any PretrainingModule subclass); the data
    section is JsonlDataModule's arguments directly. The model's tokenizer and objective
    are linked from the data section, so they are written once.
    """

    def __init__(self, *args, **kwargs):
        self.argv = list(kwargs.get("args") or [])
        self._nothing_to_do = False
        from convmodel.data import JsonlDataModule
        from convmodel.models import PretrainingModule

        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # the module configures its own optimizer and schedule (model.init_args.optimizer, ...);
        # Lightning's top-level `optimizer:`/`lr_scheduler:` keys would silently compete with them
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", ConvmodelArgumentParser)
        super().__init__(PretrainingModule, JsonlDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no `predict`: a pretraining module has nothing to predict
        return {name: args for name, args in LightningCLI.subcommands().items() if name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.tokenizer", "model.init_args.tokenizer")
        parser.link_arguments("data.objective", "model.init_args.objective")
        parser.add_argument(
            "--overwrite_checkpoints", type=bool, default=False,
            help="fit without --ckpt_path into a checkpoint folder that holds an earlier run's checkpoints: "
                 "delete them and start a new run there (otherwise that is refused)")
        parser.add_argument(
            "--peer_dir", type=str | None, default=None,
            help="another peer of the config's swarm, started in the same folder: its logs, checkpoints and "
                 "peers.txt go to this folder, and fit joins the address in the config's peers_file "
                 "(the first peer's) unless initial_peers is given (convmodel.peer_dir)")

    def before_instantiate_classes(self) -> None:
        from convmodel.peer_dir import apply_peer_dir

        subcommand = self.config.get("subcommand")
        apply_peer_dir(self.config[subcommand] if subcommand else self.config, subcommand)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI torch.loads a --ckpt_path file here, before any hook, to read saved
        # hyperparameters: check the file first, and skip that second full load when it has none
        from convmodel.ckpt_path import read_checkpoint

        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in ("last", "best", "hpc") and read_checkpoint(path).get("hyper_parameters"):
            super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs):
        """The trainer, with StepProgressBar unless the config chose a progress bar or turned bars off."""
        from pytorch_lightning.callbacks import ProgressBar

        from convmodel.progress import StepProgressBar

        config = self._get(self.config_init, "trainer", default={}) or {}
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, StepProgressBar()]
        return super().instantiate_trainer(**kwargs)

    # ---- around the subcommands ---------------------------------------------------------

    def command(self, subcommand: str, ckpt_path: str | None = None) -> list[str]:
        """This run's command line as `subcommand` (with `--ckpt_path` replaced), for the messages."""
        args, skip = [], False
        for arg in self.argv[1:] if self.argv and self.argv[0] in SUBCOMMANDS else self.argv:
            if skip:
                skip = False
            elif arg in ("--ckpt_path", "--overwrite_checkpoints"):
                skip = True
            elif not arg.startswith(("--ckpt_path=", "--overwrite_checkpoints=")):
                args.append(arg)
        script = sys.argv[0] if sys.argv and sys.argv[0].endswith("trainer.py") else "trainer/trainer.py"
        return ["python", script, subcommand, *args, *(["--ckpt_path", ckpt_path] if ckpt_path else [])]

    def _checked_ckpt_path(self, subcommand: str) -> str | None:
        from convmodel.ckpt_path import resolve_ckpt_path

        config = self.config_init[subcommand]
        path = resolve_ckpt_path(subcommand, config.get("ckpt_path"), self.trainer,
                                 bool(config.get("overwrite_checkpoints")))
        config["ckpt_path"] = path
        return path

    def before_fit(self) -> None:
        from convmodel.run_checkpoint import RunCheckpoint

        for callback in self.trainer.callbacks:
            if isinstance(callback, RunCheckpoint):
                callback.resume_command = shlex.join(self.command("fit", "last"))
        path = self._checked_ckpt_path("fit")
        step = 0
        max_steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else None
        if path is not None:
            from convmodel.ckpt_path import read_checkpoint_step

            step = read_checkpoint_step(path)
            of = f" of {max_steps} (trainer.max_steps)" if max_steps else ""
            if max_steps is not None and step >= max_steps:
                print(f"[convmodel] resuming at step {step}{of}: nothing to do; raise --trainer.max_steps to "
                      "train longer", file=sys.stderr, flush=True)
                self._nothing_to_do = True
                return
            stretched = ""
            if getattr(self.model, "schedule", None) == "linear" and getattr(self.model, "total_steps", 0) is None:
                # total_steps follows max_steps: a larger max_steps stretches the decay (the lr rises again)
                stretched = f"; the linear schedule decays to 0 at step {max_steps}"
            print(f"[convmodel] resuming at step {step}{of} from {path}{stretched}", flush=True)
        check_schedule(self.model, self.trainer, step, max_steps)

    def fit(self, model, **kwargs) -> None:
        if not self._nothing_to_do:
            self.trainer.fit(model, **kwargs)

    def after_fit(self) -> None:
        if self._nothing_to_do or not self.trainer.is_global_zero:
            return
        from convmodel.ckpt_path import checkpoint_folder
        from convmodel.fit_summary import fit_summary
        from convmodel.run_checkpoint import LAST

        folder = checkpoint_folder(self.trainer)
        last = os.path.join(folder, LAST) if folder else None
        checkpoint = last if last and os.path.isfile(last) else None
        print(fit_summary(self.trainer, checkpoint, self.command("test", "last"), self.command("fit", "last")),
              flush=True)

    def before_validate(self) -> None:
        self._checked_ckpt_path("validate")

    def before_test(self) -> None:
        self._checked_ckpt_path("test")


def check_schedule(model, trainer, step: int, max_steps: int | None) -> None:
    """A linear schedule that ends before trainer.max_steps would train the remaining steps at lr 0.

    Skipped where the strategy steps the schedule itself (`steps_schedule_itself`: HivemindStrategy
    counts collaborative epochs, not local batches, so its total_steps is not comparable with
    max_steps). Read as an attribute so that this command line never imports the swarm's code.
    """
    if (getattr(model, "schedule", None) != "linear" or max_steps is None
            or getattr(trainer.strategy, "steps_schedule_itself", False)):
        return
    total = model.total_steps or max_steps
    if total >= max_steps:
        return
    if step >= total:
        raise UserError(
            f"the linear schedule ended at step {total} (model.init_args.total_steps): resuming at step {step} "
            f"to trainer.max_steps {max_steps} would train at learning rate 0; raise model.init_args.total_steps "
            f"to {max_steps} (or leave it out to follow trainer.max_steps), or use model.init_args.schedule constant")
    from pytorch_lightning.utilities import rank_zero_warn

    rank_zero_warn(f"model.init_args.total_steps ({total}) < trainer.max_steps ({max_steps}): the linear schedule "
                   f"reaches 0 at step {total}, so steps {total}-{max_steps} train at learning rate 0")


def enable_docstring_help() -> None:
    """Let `--help` show each argument's line from the Args section of its class docstring."""
    from jsonargparse import set_parsing_settings
    from jsonargparse._optionals import docstring_parser_support

    if docstring_parser_support:
        from docstring_parser import DocstringStyle

        set_parsing_settings(docstring_parse_style=DocstringStyle.GOOGLE)


def find_in_chain(exc: BaseException, kind: type) -> BaseException | None:
    """The `kind` exception behind `exc`: `exc` itself, or one a library was handling when it raised `exc`."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when a library re-raised it wrapped in another exception."""
    return find_in_chain(exc, UserError)


def with_default_subcommand(argv: list[str]) -> list[str]:
    """`trainer.py --config X` means `trainer.py fit --config X`."""
    if argv and argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help"):
        return ["fit", *argv]
    return list(argv)


def exit_on_user_error(run) -> None:
    """Call `run()`; a UserError (also one a library re-raised wrapped) prints one `error:` line, exit 2."""
    try:
        run()
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        print(f"error: {user_message(user_error)}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; a user mistake ends with `error: <what to do>` and exit status 2."""
    enable_docstring_help()
    # we pass the arguments ourselves (with `fit` inserted); Lightning warns when sys.argv is also set
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    argv = with_default_subcommand(sys.argv[1:] if argv is None else argv)
    try:
        exit_on_user_error(lambda: ConvmodelCLI(args=argv))
    except KeyboardInterrupt:
        # a second Ctrl-C after Lightning's own handling ended (a swarm peer's goodbye had finished and the
        # summary was printing): the run is saved and summarized as far as it got; stop at once, no traceback
        stop_at_once()
    except Exception as exc:
        # a second Ctrl-C that lands in Lightning's teardown (closing the TensorBoard writer) makes its
        # interrupt handling fail in turn ("Writer is closed"): that is still the user stopping at once
        if find_in_chain(exc, KeyboardInterrupt) is None:
            raise
        stop_at_once()
    except SystemExit as exc:
        status = interrupt_exit_status(exc)
        if status is None:
            raise
        sys.exit(status)


def stop_at_once() -> None:
    """Exit 130 with one line: the user pressed Ctrl-C again; what could be saved was saved before."""
    print("[convmodel] stopping at once (Ctrl-C)", file=sys.stderr, flush=True)
    sys.exit(EXIT_SIGINT)


def interrupt_exit_status(exc: SystemExit) -> int | None:
    """130 after Ctrl-C, 143 after SIGTERM (Lightning exits 1 and 0 there), None for any other exit.

    Lightning turns a KeyboardInterrupt into `sys.exit(1)` inside its handler (so the exit's
    context is the KeyboardInterrupt) and SIGTERM into a SIGTERMException, a SystemExit.
    """
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    if isinstance(exc, SIGTERMException):
        return EXIT_SIGTERM
    if isinstance(exc.__context__, KeyboardInterrupt):
        return EXIT_SIGINT
    return None
