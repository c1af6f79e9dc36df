"""The one exception type whose message is shown to the user as a single line."""


class CircuitfindError(Exception):
    """Bad input or an untrustworthy run: the message names the problem and the fix."""
