import sys

from fastctx.cli import main

sys.exit(main())
