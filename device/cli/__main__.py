import sys

from edgeftl.device.cli import main

sys.exit(main())
