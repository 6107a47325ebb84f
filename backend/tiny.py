"""`python -m backend.tiny DIR`, as older docs and scripts wrote it: the tiny model now lives in backend/models/tiny.py.

Kept as an entry point only, so those commands keep working; it says where the model moved. Import
`backend.models.tiny` in code.
"""

from __future__ import annotations

import sys

from .models.tiny import main

if __name__ == "__main__":
    print("note: backend.tiny moved to backend.models.tiny; run python -m backend.models.tiny DIR", file=sys.stderr)
    sys.exit(main())
