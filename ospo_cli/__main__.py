"""`python -m ospo_cli ...` is the `ospo` command (tests run it so, with the interpreter under test)."""

import sys

from ospo_cli.main import main

sys.exit(main())
