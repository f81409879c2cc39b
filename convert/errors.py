"""The convert package's user-facing error."""

from ascend.errors import AscendDeployError


class ConvertError(AscendDeployError):
    """Bad checkpoint, plan or output directory: one line naming the file/tensor and what was expected."""
