"""Errors a user can cause and fix: the command line prints each as one line and exits with status 2,
so every message says what is wrong and how to fix it."""
import re

__all__ = ['FerKDError', 'BankError', 'BankMismatchError', 'ConfigError', 'HubError']

# torch re-raises a worker's exception as ``type(e)(msg)``, msg = "Caught <Name> in DataLoader worker
# process N.\nOriginal Traceback (most recent call last): ...<module>.<Name>: <message>"
_WORKER_WRAPPER = re.compile(r'Caught (\w+) in (?:DataLoader worker process \d+|pin memory thread)\.\nOriginal ')


class FerKDError(Exception):
    """Base class of the errors that the command line reports as one line, exit code 2.

    Raised in a DataLoader worker, torch hands the error to the main process with the worker's whole
    traceback as its message; the error rebuilt there keeps only the original one-line message
    (the traceback stays available as ``worker_traceback``).
    """

    def __init__(self, *args):
        self.worker_traceback = None
        if len(args) == 1 and isinstance(args[0], str):
            match = _WORKER_WRAPPER.match(args[0])
            if match and match.group(1) == type(self).__name__:
                tail = f'{type(self).__module__}.{type(self).__qualname__}: '
                at = args[0].rfind(tail)
                if at >= 0:
                    self.worker_traceback = args[0]
                    args = (args[0][at + len(tail):].strip(),)
        super().__init__(*args)


class ConfigError(FerKDError, ValueError):
    """An option value that cannot work (regions < 1, k > num_classes, thresholds out of order)."""


class BankError(FerKDError):
    """A soft-label bank that cannot be read: missing files, corrupt or truncated shards, unknown version."""


class BankMismatchError(BankError):
    """A bank that is valid on its own but belongs to another dataset, split or class count."""


class HubError(FerKDError):
    """A Hugging Face Hub bank name that cannot be resolved (unknown repo or revision, offline, not a bank)."""
