"""The one exception type the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class SpecialistsError(Exception):
    """A problem with the user's input or environment, stated in one line that names the culprit.

    The command line prints ``error: <message>`` and exits with status 2; no traceback unless
    ``--debug`` is given. Library code raises it for anything a user can fix.
    """
