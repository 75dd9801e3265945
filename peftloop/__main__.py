import sys

from peftloop.cli import main

sys.exit(main())
