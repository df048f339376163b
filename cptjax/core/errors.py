"""The one exception type that reaches users: a message that says what, where, and what to do."""


class CptjaxError(Exception):
    """A problem with the user's input (a file, a key, a value), reported as one line by the CLI."""
