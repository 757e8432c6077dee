"""``python -m serve_app.corpus``: the offline corpus job's command line."""

import sys

from .cli import main

sys.exit(main())
