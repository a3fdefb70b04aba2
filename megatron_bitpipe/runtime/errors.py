"""The runtime's communication errors; every message names the rank, the peer and the action."""

import re


class P2PError(RuntimeError):
    """A message failed; the text names the rank, the peer and the action."""


class P2PTimeoutError(P2PError):
    """A message did not arrive (or leave) within the timeout."""


def backend_reason(error: BaseException) -> str:
    """What a backend error means, in a few words (gloo's messages run to several lines)."""
    text = str(error)
    for phrase in ("Connection reset by peer", "Connection closed by peer", "Broken pipe"):
        if phrase in text:
            return f"a peer is gone ({phrase})"
    timed_out = re.search(r"Timed out waiting (\d+)ms for (\w+)", text)
    if timed_out:
        seconds = int(timed_out.group(1)) / 1000
        return f"timed out after {seconds:g} s waiting for a {timed_out.group(2)} (a peer made no progress)"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\] ", "", first)[:300]
