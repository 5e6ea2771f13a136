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
    """A write of `path` ran out of room: no space left on the device (the default `problem`), a quota or the
    file-size limit. The message says so, not the writer's own error."""

    def __init__(self, path, consequence: str = "", problem: str = "no space left on the device"):
        self.path, self.problem = str(path), problem
        head = ("no space left writing " + self.path if problem == "no space left on the device"
                else f"{problem} writing {self.path}")
        UserInputError.__init__(self, head + (f"; {consequence}" if consequence else ""))
