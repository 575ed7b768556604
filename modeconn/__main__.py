import sys

from modeconn.cli import main

sys.exit(main())
