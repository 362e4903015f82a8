"""`python -m tfbn`: the same command line as `tfbn`."""

import sys

from tfbn.cli import main

sys.exit(main())
