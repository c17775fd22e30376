"""python -m erase.worst_case"""

import sys

from erase.worst_case.cli import main

sys.exit(main())
