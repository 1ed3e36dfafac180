"""The one exception type the CLI turns into a one-line error message and a non-zero exit."""


class FacegenError(Exception):
    """A problem with the user's input (files, names, values), reported without a traceback."""
