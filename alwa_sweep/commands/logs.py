"""``alwa-sweep logs``: the driver's output of a sweep submitted as a Ray Job."""

from alwa_sweep.commands.jobs import add_logs_arguments as add_arguments  # noqa: F401
from alwa_sweep.commands.jobs import logs as run  # noqa: F401

