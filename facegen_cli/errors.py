"""The one exception type the CLI turns into a one-line error message and a non-zero exit."""


class FacegenError(Exception):
    """A problem with the user's input (files, names, values), reported without a traceback."""


def first_line(error):
    """The first line of an exception's message (library errors can run to pages), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
