"""The training command line: LightningCLI over PretrainingModule and JsonlDataModule.

`trainer.py --config configs/bert-tiny.yaml` trains (`fit` is implied); `trainer.py test
--config ... --ckpt_path last` evaluates. Every knob is a YAML key with its docstring in
`--help`, and `--print_config` shows the full resolved config.
"""

import re
import sys
import warnings

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from convmodel.errors import UserError, user_message
from convmodel.heap import keep_heap_from_growing

SUBCOMMANDS = ("fit", "validate", "test")


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
        import convmodel.collaborative  # noqa: F401  (registers `trainer.strategy: hivemind`)
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


def enable_docstring_help() -> None:
    """Let `--help` show each argument's line from the Args section of its class docstring."""
    from jsonargparse import set_parsing_settings
    from jsonargparse._optionals import docstring_parser_support

    if docstring_parser_support:
        from docstring_parser import DocstringStyle

        set_parsing_settings(docstring_parse_style=DocstringStyle.GOOGLE)


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when a library re-raised it wrapped in another exception."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


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
    argv = with_default_subcommand(sys.argv[1:] if argv is None else argv)
    keep_heap_from_growing()
    enable_docstring_help()
    # we pass the arguments ourselves (with `fit` inserted); Lightning warns when sys.argv is also set
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    exit_on_user_error(lambda: ConvmodelCLI(args=argv))
