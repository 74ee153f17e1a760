"""Container health probe: exit 0 iff GET /health on the local server answers 200.

Docker's HEALTHCHECK runs this inside the image, which carries no curl; the port
comes from the same SIFT_PORT the server reads, so overriding one overrides both.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = f"http://127.0.0.1:{os.environ.get('SIFT_PORT', '8000')}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
