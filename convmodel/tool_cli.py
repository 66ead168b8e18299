"""The command line of the fire-based tools: arguments checked against the function before it runs.

fire alone runs a tool with its defaults when a flag is misspelled and complains only after the
work is done (`ERROR: Could not consume arg: --dtyp`, then the methods of `str`), so the output
is already written and the corrected rerun needs --overwrite. Its `--help` opens a pager. Here the
flags are compared with the function's signature first: an unknown flag, a missing required one
or a stray positional value is one `error:` line (exit 2) before anything happens, and `--help`
prints a line per option, from the Args section of the function's Google-style docstring.
fire still turns the values into Python values.
"""

import difflib
import inspect
import re
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from convmodel.errors import UserError, user_message

HELP_FLAGS = ("-h", "--help")
HELP_WIDTH = 100


def run_tool(function: Callable, argv: list[str] | None, name: str,
             failures: dict[type[BaseException], int] | None = None) -> Any:
    """Check `argv` against `function`, then call it with fire; its return value.

    A UserError prints `error: <message>` and exits 2; an exception of a type in `failures`
    prints the same and exits with that status (export's failed upload: 1).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    checked = argv[:argv.index("--")] if "--" in argv else argv
    if any(arg in HELP_FLAGS for arg in checked):
        print(help_text(function, name))
        sys.exit(0)
    try:
        check_arguments(function, checked, name)
    except UserError as exc:
        _fail(str(exc), 2)
    import fire

    try:
        return fire.Fire(function, command=argv, name=name, serialize=lambda _: None)
    except UserError as exc:
        _fail(user_message(exc) or str(exc), 2)
    except tuple(failures or ()) as exc:
        _fail(str(exc), next(code for kind, code in failures.items() if isinstance(exc, kind)))


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_arguments(function: Callable, argv: list[str], name: str) -> None:
    """Raise UserError for an unknown flag (naming the closest valid one), a missing or surplus argument.

    fire's rules: `--flag value`, `--flag=value`, `--flag` alone (True) when the next argument is
    another flag or there is none, `--noflag` (False), hyphens as underscores; other values fill
    the parameters in order.
    """
    parameters = _parameters(function)
    given: set[str] = set()
    positional: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        key, has_value, _ = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in parameters and key.startswith("no") and key[2:] in parameters and not has_value:
            given.add(key[2:])
            continue
        if key not in parameters:
            raise UserError(_unknown_flag(arg.partition("=")[0], parameters, name))
        given.add(key)
        if not has_value and index < len(argv) and not argv[index].startswith("--"):
            index += 1  # the flag's value
    unfilled = [p for p in parameters if p not in given]
    if len(positional) > len(unfilled):
        raise UserError(f"unexpected argument {positional[len(unfilled)]!r}: {name} takes its values as "
                        f"--name value (see {name} --help)")
    for parameter in unfilled[len(positional):]:
        if parameters[parameter].default is inspect.Parameter.empty:
            description = _option_descriptions(function).get(parameter, "")
            raise UserError(f"--{parameter} is required" + (f": {description.rstrip('.')}" if description else "")
                            + f"; see {name} --help")


def _parameters(function: Callable) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(function).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _unknown_flag(flag: str, parameters: dict[str, inspect.Parameter], name: str) -> str:
    closest = difflib.get_close_matches(flag[2:].replace("-", "_"), list(parameters), n=1, cutoff=0.5)
    if closest:
        return f"unknown option {flag}; did you mean --{closest[0]}? (see {name} --help)"
    return f"unknown option {flag}; the options are " + ", ".join(f"--{p}" for p in parameters)


def _option_descriptions(function: Callable) -> dict[str, str]:
    """`name: description` of the docstring's Args section, continuation lines joined."""
    doc = inspect.getdoc(function) or ""
    descriptions: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        if re.fullmatch(r"(Args|Arguments):\s*", line):
            in_args = True
            continue
        if not in_args:
            continue
        if line and not line.startswith(" "):  # the next section (Returns:, Raises:, ...)
            break
        match = re.match(r"^ {2,8}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if match and match.group(1) in _parameters(function):
            current = match.group(1)
            descriptions[current] = match.group(2).strip()
        elif current and line.strip():
            descriptions[current] += " " + line.strip()
    return descriptions


def help_text(function: Callable, name: str) -> str:
    """The tool's --help: usage, the docstring's summary, and each option with its description and default."""
    parameters = _parameters(function)
    descriptions = _option_descriptions(function)
    required = [p for p, info in parameters.items() if info.default is inspect.Parameter.empty]
    usage = " ".join([f"usage: {name}", *(f"--{p} {p.upper()}" for p in required), "[options]"])
    summary = (inspect.getdoc(function) or "").split("\n\n")[0].strip()
    lines = [usage, ""] + ([summary, ""] if summary else []) + ["options:"]
    for parameter, info in parameters.items():
        is_flag = info.default is False or info.annotation is bool
        head = f"  --{parameter}" + ("" if is_flag else f" {parameter.upper()}")
        text = descriptions.get(parameter, "")
        if info.default is inspect.Parameter.empty:
            text += " (required)"
        elif not is_flag and info.default is not None:
            text += f" (default: {info.default})"
        lines.append(head)
        lines.extend(textwrap.wrap(text.strip(), HELP_WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines += ["  -h, --help", "      print this help and exit"]
    return "\n".join(lines)
