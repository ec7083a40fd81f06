"""User-facing errors.

Anything a user can fix (a wrong path, a bad width, an empty corpus) raises ``RedError``
with a message that names the problem and the fix. The CLI prints it on one line and
exits with code 2; the Python API lets it propagate like any exception.
"""


class RedError(Exception):
    """A problem with the user's input, explained in the message."""
