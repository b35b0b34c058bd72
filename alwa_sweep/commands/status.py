"""``alwa-sweep status``: the state of sweeps submitted as Ray Jobs (``run --submit``)."""

from alwa_sweep.commands.jobs import add_status_arguments as add_arguments  # noqa: F401
from alwa_sweep.commands.jobs import status as run  # noqa: F401

