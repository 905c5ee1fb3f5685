import sys

from slimopt.cli import main

sys.exit(main())
