"""The runtime's communication errors; every message names the rank, the peer and the action."""


class P2PError(RuntimeError):
    """A message failed; the text names the rank, the peer and the action."""


class P2PTimeoutError(P2PError):
    """A message did not arrive (or leave) within the timeout."""
