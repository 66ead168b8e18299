"""The one exception type for mistakes a user can fix (bad file, option, shard line).

Entry points catch it and print its message alone, without a traceback: the message
already names the file, line or option and says what to do.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that says how to fix it."""


def user_message(exc: BaseException) -> str | None:
    """The message of a UserError, also when a DataLoader worker re-raised it.

    torch re-raises worker exceptions as the same type with the worker's traceback
    prepended; the user only needs the last line.
    """
    if not isinstance(exc, UserError):
        return None
    text = str(exc)
    marker = "UserError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return text
