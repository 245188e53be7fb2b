import sys

from flowopd.bench.cli import main

sys.exit(main())
