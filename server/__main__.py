"""``python -m sift.server serve | generate | bench``."""
import sys

from sift.server.cli import main

sys.exit(main())
