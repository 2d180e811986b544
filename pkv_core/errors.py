"""The two kinds of failure the CLI distinguishes (exit codes 2 and 1)."""


class UserInputError(Exception):
    """Bad input from the user: a wrong model path, an invalid hyperparameter, a corrupt file. Exit code 2."""

    exit_code = 2


class JobError(Exception):
    """The input was fine but the job failed (e.g. an engine disagrees with the reference). Exit code 1."""

    exit_code = 1
