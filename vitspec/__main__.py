import sys

from vitspec.cli import main

sys.exit(main())
