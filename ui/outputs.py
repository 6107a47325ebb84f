"""OutputStore: the PNG files the gallery serves, bounded in number."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from backend.core.metadata import png_bytes


class OutputStore:
    """PNG files the gallery serves, kept in Gradio's cache folder and bounded in number.

    Writing the PNG ourselves (fast zlib level, infotext chunk) and handing Gradio a path already
    inside its cache skips Gradio's own encode-at-level-6 + hash + copy of each image.
    """

    def __init__(self, root: str | Path | None = None, max_files: int = 256, png_level: int = 0):
        base = Path(root or os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
        self.root = (base / f"sd-outputs-{os.getpid()}").resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_files = max_files
        self.png_level = png_level
        self._files: deque[Path] = deque()
        self._lock = threading.Lock()

    def save(self, image: Any, seed: int) -> str:
        """Write one image; the oldest files go once there are more than max_files."""
        folder = self.root / uuid.uuid4().hex
        folder.mkdir()
        path = folder / f"{seed}.png"
        path.write_bytes(png_bytes(image, self.png_level))
        with self._lock:
            self._files.append(path)
            while len(self._files) > self.max_files:
                old = self._files.popleft()
                shutil.rmtree(old.parent, ignore_errors=True)
        return str(path)

    def close(self) -> None:
        """Remove every file this store wrote."""
        shutil.rmtree(self.root, ignore_errors=True)
