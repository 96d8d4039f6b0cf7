"""The one exception type users see. The CLI turns it into a one-line message and exit code 2."""


class JumpflowError(Exception):
    """A user-facing error: bad input, bad config, missing or corrupt files, a diverged run."""


class TrainingDiverged(JumpflowError):
    """The loss became NaN or infinite; the last good checkpoint is kept on disk."""
