import sys

from fm9g.cli import main

sys.exit(main())
