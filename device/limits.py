"""How much local work a device accepts from one task: its own limits, below the protocol's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only a type here: `edgeftl device supervise` parses these flags and must not load numpy
    from edgeftl.device.protocol.messages import Task


@dataclass(frozen=True)
class TaskLimits:
    """The most local work this device accepts from one task (a forged or mistaken task with
    steps=100000 would otherwise tie it up for hours); a task beyond them gets the error reply
    `task_limits` instead of training."""

    max_steps: int = 1000
    max_epochs: int = 10
    max_batch: int = 256

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if type(value) is not int or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")

    def breach(self, task: Task) -> str | None:
        """Why `task` asks for more than these limits allow, or None."""
        for name, asked, limit in (("steps", task.steps, self.max_steps), ("epochs", task.epochs, self.max_epochs),
                                   ("batch", task.batch, self.max_batch)):
            if asked is not None and asked > limit:
                return f"the task asks for {name}={asked}, above this device's limit of {limit} (--max-{name})"
        return None
