import sys

from megaloc_ros.cli import main

sys.exit(main())
