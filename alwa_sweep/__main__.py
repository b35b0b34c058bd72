import sys

from alwa_sweep.cli import main

sys.exit(main())
