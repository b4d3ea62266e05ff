"""The base class of every typed config section.

Each component owns its config as a pydantic model deriving from `StrictModel`, so an
unknown key, a wrong type or an out-of-range value is rejected when the file is loaded,
never silently ignored. `tensormine.config` composes the sections into one run config.
"""

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)
