"""The `eigenprune` command's entry point. It lives outside the package so that it runs before `import eigenprune`
loads torch (1-2 s, longer on a busy machine): a Ctrl-C, SIGTERM or SIGHUP in that time ends the command with
`interrupted` and exit status 128 + the signal, as it does once the command runs (`eigenprune.cli.main`), instead
of a traceback or a silent end."""

import os
import signal
import sys

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Interrupted(BaseException):
    """A signal while the package loads."""


def _interrupted(signum: int, frame: object) -> None:
    raise _Interrupted(signum)


def main() -> None:
    """Load eigenprune's command line with the three signals caught, then run it with its own handlers."""
    for sig in _SIGNALS:
        signal.signal(sig, _interrupted)
    try:
        from eigenprune import cli
    except _Interrupted as err:
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(128 + err.args[0])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt again, which cli.main handles
    for sig in _SIGNALS[1:]:
        signal.signal(sig, cli._raise_interrupted)  # until the command sets them again: the same exception
    cli.main()
