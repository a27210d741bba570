"""Errors meant for people, not stack traces."""


class UserError(Exception):
    """Bad input the user can fix: say which file, what was expected, and what to do.

    Command-line entry points catch it, print the message and exit with status 2,
    so a typo never ends in a traceback wall.
    """
