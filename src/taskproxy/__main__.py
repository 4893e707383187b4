import sys

from taskproxy.cli import main

sys.exit(main())
