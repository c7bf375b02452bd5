"""Token authentication to an existing Ray cluster, with the token as Ray's own CLI finds it.

A stock `ray start --head` (Ray 2.60) turns token authentication on when it finds a token:
`RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH` names, else `~/.ray/auth_token` (written by
`ray get-auth-token --generate`, or by any `ray.init()` that started a local Ray). A driver
finds its token the same way but sends it only in token mode (`RAY_AUTH_MODE=token`), which
`ray.init` turns on by itself only for `address="auto"`: given an address (`RAY_ADDRESS=
HOST:PORT`) it connects without one and is refused twenty times over 21 s.

So before `ray.init`, the cluster is asked once whether it lets this process in (one GCS
request, answered in milliseconds). Refused for want of a token while one is found, token mode
is turned on as `address="auto"` would turn it on; refused still (no token, the wrong one, or
`RAY_AUTH_MODE=disabled`), the run stops at once with one message naming the fix.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from runner.errors import ClusterError

log = logging.getLogger(__name__)

# seconds the question may take (a real GCS answers in milliseconds; an address that is not
# one is left to `ray.init` to report)
ASK_BOUND = 10.0


def authenticate(address: str, gcs: str, verbose: bool = False, bound: float = ASK_BOUND) -> None:
    """Make sure this process can join the Ray cluster at `address` (as the user gave it; its
    GCS at `gcs`, `HOST:PORT`): turn token mode on where the cluster asks for a token and Ray
    finds one; a ClusterError naming authentication and its fix where the cluster refuses this
    process whatever it sends."""
    try:
        from ray._private.authentication import authentication_token_setup as setup
        from ray._raylet import AuthenticationTokenLoader  # type: ignore[attr-defined]
    except ImportError:  # a Ray without token authentication
        return
    if _admitted(gcs, verbose, bound) is not False:
        return
    mode = os.environ.get(setup.AUTH_MODE_ENV_VAR)
    found = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    if mode is None and found:
        setup._enable_token_auth()  # what ray.init(address="auto") does when it finds a token
        if _admitted(gcs, verbose, bound) is not False:
            log.info("Ray at %s asks for a token: using %s, as Ray's CLI does", address, source())
            return
    raise ClusterError(refused(address, mode, source() if found else None))


def source() -> str:
    """Where Ray takes the token from, in its own order."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"RAY_AUTH_TOKEN_PATH ({path})"
    return "~/.ray/auth_token"


def refused(address: str, mode: str | None, token: str | None) -> str:
    """The one message for a cluster that refuses this process for its token."""
    head = f"Ray at {address!r} refused this process: the cluster has token authentication on"
    fix = (
        "put the cluster's token (`ray get-auth-token` on its head node prints it) in "
        "RAY_AUTH_TOKEN, in ~/.ray/auth_token, or in a file named by RAY_AUTH_TOKEN_PATH"
    )
    if mode is not None and mode.lower() != "token":
        unset = "unset RAY_AUTH_MODE (or set it to token)"
        return f"{head}, and RAY_AUTH_MODE={mode} sends no token: {unset}"
    if token is None:
        return f"{head} and no token was found here: {fix}"
    return f"{head} and does not take the token from {token}: {fix}"


def _admitted(address: str, verbose: bool, bound: float) -> bool | None:
    """Whether the GCS at `address` lets this process in: False when it refuses its token
    (or the lack of one), None when no answer came within `bound` seconds or the question
    failed otherwise (`ray.init` then says what is wrong), True when it does."""
    from ray._raylet import GcsClient  # type: ignore[attr-defined]
    from ray.exceptions import AuthenticationError

    answer: list[bool | None] = []

    def ask() -> None:
        try:
            GcsClient(address=address)
            answer.append(True)
        except AuthenticationError:
            answer.append(False)
        except Exception:  # unreachable, not a GCS, another version: not ours to say
            answer.append(None)

    # the client blocks (without the GIL) up to Ray's own reconnect timeout on an address that
    # is not a GCS: asked in a thread, waited for within the bound
    asking = threading.Thread(target=ask, name="runner-ray-auth", daemon=True)
    with _stderr_hidden(not verbose):
        asking.start()
        asking.join(bound)
    return answer[0] if answer else None


@contextmanager
def _stderr_hidden(hide: bool) -> Iterator[None]:
    """File descriptor 2 pointed at /dev/null while the question is asked: Ray's C++ client
    logs each refusal there, and the refusal is said once, in the message above."""
    if not hide:
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
