import sys

from freezeasguard.engine.cli.main import main

sys.exit(main())
