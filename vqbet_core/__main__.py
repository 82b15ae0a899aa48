import sys

from vqbet_core.cli.main import main

sys.exit(main())
