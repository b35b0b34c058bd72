"""Errors raised for bad user input (configs, dataset trees, files).

The CLI prints them as one paragraph without a traceback and exits non-zero, so
the message must name the field or file and say what to do.
"""


class UserInputError(ValueError):
    """Bad user input detected before (or instead of) running anything.

    ``where`` names the config field (``model.detector``) or the file path at fault;
    ``hint`` tells the user what to do about it.
    """

    def __init__(self, where: str, problem: str, hint: str = ""):
        self.where = where
        self.problem = problem
        self.hint = hint
        message = f"{where}: {problem}"
        if hint:
            message += f" {hint}"
        super().__init__(message)


class ConfigError(UserInputError):
    """A config or sweep-spec field is missing, unknown or out of range."""


class DatasetError(UserInputError):
    """A dataset tree or annotation file is missing or malformed."""


def choice_error(field: str, value, allowed) -> ConfigError:
    """The error for a value outside a fixed set, listing the allowed values."""
    allowed_list = ", ".join(sorted(str(a) for a in allowed))
    return ConfigError(field, f"unknown value {value!r}.", f"Allowed values: {allowed_list}.")


class ConfigErrors(ConfigError):
    """Several problems of one config or spec, reported together (one paragraph each)."""

    def __init__(self, errors: list[UserInputError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.where, first.problem, first.hint)
        self.args = (f"{len(self.errors)} problems:\n" + "\n".join(f"- {e}" for e in self.errors),)

    def __str__(self) -> str:
        return self.args[0]


class Interrupted(BaseException):
    """The process was asked to stop (SIGTERM, SIGHUP; SIGINT raises KeyboardInterrupt).

    A BaseException, like KeyboardInterrupt, so ``except Exception`` blocks let it
    through and every ``finally`` runs: runs are recorded as interrupted, not left open.
    """

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def interruption_reason(exc: BaseException) -> str:
    """One line for an interruption: ``interrupted by SIGTERM``."""
    name = getattr(exc, "signal_name", None) or ("SIGINT" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__)
    return f"interrupted by {name}"


class CheckpointWriteError(UserInputError):
    """A checkpoint could not be written (disk full, permissions, ...); nothing partial is left."""


class NoResumableCheckpointError(UserInputError):
    """``--resume`` points at a folder without any intact checkpoint."""
