import sys

from tgedge.cli import main

sys.exit(main())
