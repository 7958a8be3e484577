"""The project's error types: what a user got wrong, as opposed to a bug in hooked-vit.

The command line prints a `UserError` as one line and exits 2; any other exception is an
internal error and is shown with its traceback and a "please report" line.
"""


class UserError(ValueError):
    """Something the user can fix (a value, a file, a spec); the message says what and how."""


class UnsupportedModelError(UserError):
    """The model uses a feature HookedViT does not implement."""


class CheckpointError(UserError):
    """A checkpoint file could not be loaded safely or does not fit the model."""


class UnknownHookError(UserError, KeyError):
    """A hook point name the model does not have (a KeyError too, as a missing key of `hook_dict`)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
