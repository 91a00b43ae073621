"""``python -m tmanet``: the same as the ``tmanet`` command."""
import sys

from .cli import main

sys.exit(main())
