"""The planner's user-facing error."""

from ascend.errors import AscendDeployError


class PlanError(AscendDeployError):
    """A plan that cannot be made or read: the message says what would work."""
