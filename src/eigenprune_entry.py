"""The `eigenprune` command's entry point. It lives outside the package so that it runs before `import eigenprune`
loads torch (1-2 s, longer on a busy machine): a Ctrl-C, SIGTERM or SIGHUP in that time ends the command with
`interrupted` and exit status 128 + the signal, as it does once the command runs (`eigenprune.cli.main`), instead
of a traceback or a silent end."""

import os
import signal
import sys

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupted(signum: int, frame: object) -> None:
    """End at once: nothing is written or started while the package loads. Raising an exception here instead would
    surface inside whatever C extension is initialising (numpy's, under torch's import) and come out as that
    module's ImportError traceback."""
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    """Load eigenprune's command line with the three signals caught, then run it with its own handlers."""
    for sig in _SIGNALS:
        signal.signal(sig, _interrupted)
    from eigenprune import cli
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is KeyboardInterrupt again, which cli.main handles
    for sig in _SIGNALS[1:]:
        signal.signal(sig, cli._raise_interrupted)  # until the command sets them again: the same exception
    cli.main()
