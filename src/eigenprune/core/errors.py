"""The one base of eigenprune's own errors."""


class EigenpruneError(Exception):
    """A problem with what eigenprune was given (a config, a path, a model, data) or with where it runs, stated in
    one line that names the bad value and what would be valid. Every error class of eigenprune derives from it
    (beside `ValueError` or `RuntimeError`, as before), and the command line catches it in one place: `error: ...`,
    exit status 2. Anything else that escapes is a bug and keeps its traceback."""
