"""The one exception type users see.

Every package raises a subclass of `AscendDeployError` for problems the user can fix (bad input
file, impossible layout, missing backend). The CLI prints such an error as a single line naming the
file, tensor or option and what was expected, and exits 2; so does an OSError on a path the user named
(missing folder, permissions, full disk). Anything else is a bug and keeps its traceback.
"""


class AscendDeployError(Exception):
    """A user-facing error: its message is complete on one line."""
