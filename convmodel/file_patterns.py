"""Options that name files: paths, comma-separated lists and glob patterns -> the files, in order.

Every tool reads such an option (`--input` of train_tokenizer and prepare_train_data, the
DataModule's shard lists), and each used to expand it its own way: one expanded `~`, one did not,
one took `a.txt,b.txt`, one did not. Here is the one rule:

- a list (YAML, or fire's `[a,b]`), a string with commas, or a single path or pattern; fire may
  hand over a number (`--input 2024`) or a list it left as the string "[a, b]";
- `~` is the home directory; quotes a shell left around a part are stripped;
- a part that is the path of a file names that file (even `notes[1].txt`); otherwise a part with
  glob magic (`*`, `?`, `[...]`, `**` for any depth) names the files it matches, sorted;
- a file named twice counts once, at its first place; directories are not files;
- a part that names no file is one UserError naming the option and the part as typed.
"""

import glob
import os

from convmodel.errors import UserError

DEFAULT_HINT = "Check the path (quote glob patterns)."


def expand_file_patterns(option: str, patterns, hint: str = DEFAULT_HINT) -> list[str]:
    """The files `patterns` names (see the module docstring); `option` and `hint` go into the errors."""
    parts = [part.strip(" '\"") for pattern in _as_list(patterns) for part in str(pattern).split(",")]
    parts = [part for part in parts if part]
    if not parts:
        raise UserError(f"{option} is empty; give files, a comma-separated list or a quoted glob such as 'data/*.txt'.")
    files: list[str] = []
    seen: set[str] = set()
    for part in parts:
        path = os.path.expanduser(part)
        if os.path.isfile(path):
            matches = [path]
        elif glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        else:
            matches = []
        if not matches:
            raise UserError(f"{option} {part}: no such file. {hint}")
        for match in matches:
            if match not in seen:
                seen.add(match)
                files.append(match)
    return files


def _as_list(patterns) -> list:
    if isinstance(patterns, list | tuple):
        return list(patterns)
    text = str(patterns)  # fire turns `--input 2024` into an int
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]  # a list on the command line that fire left as a string
    return [text]
