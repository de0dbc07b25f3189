import sys

from edgeftl.coordinator.cli import main

sys.exit(main())
