"""``python -m server serve | generate | bench``."""
import sys

from server.cli import main

sys.exit(main())
