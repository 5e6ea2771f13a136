"""The errors the trainer reports to its user as one line (the CLI prints `dpo-kernels train: error: <message>` and
exits with status 2): a setting, an input file or a checkpoint that is wrong, never a bug of the package."""


class UserInputError(ValueError):
    """A setting or an input the user gave is wrong; the message names it and says what to do."""


class InputFileError(UserInputError):
    """A file or directory the run reads or writes is missing, unreadable, corrupt or cannot be written."""

    def __init__(self, path, problem: str):
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")


class DiskFullError(InputFileError):
    """No space left on the device while writing `path` (the message says so, not the writer's own error)."""

    def __init__(self, path, consequence: str = ""):
        self.path, self.problem = str(path), "no space left on the device"
        UserInputError.__init__(self, f"no space left writing {self.path}" + (f"; {consequence}" if consequence
                                                                              else ""))
