"""Pictures the page and the API send: Gradio's file payloads -> what GenerationRequest takes.

The generating events run with preprocess=False (app.py), so an image input reaches the handler as
Gradio's FileData dict, whose file Gradio has already checked is one it received (an upload, or its
cache; gradio/processing_utils.py `async_move_files_to_cache`). The bytes go to the request as they
came; decoding and every check on them (format, pixel limit, size) is backend/core/input_images.py's.

The Inpaint tab's gr.ImageEditor sends {"background", "layers", "composite"} (gradio/components/
image_editor.py, EditorData): the background is the uploaded picture, and what a person painted is
in the layers, transparent where nothing was painted, so the mask is the layers' alpha.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backend import InvalidRequest
from backend.core.input_images import MAX_INPUT_BYTES, load_picture


def file_bytes(name: str, value: Any) -> bytes | Any | None:
    """The bytes of an uploaded file (a FileData dict or a path), or None; bytes and PIL images pass through."""
    if value is None or isinstance(value, (bytes, bytearray)) or hasattr(value, "getpixel"):
        return value
    path = value.get("path") if isinstance(value, dict) else None
    if not isinstance(path, str) or not path:
        raise InvalidRequest(f"{name}: must be an image file (PNG, JPEG or WebP); upload one.", name)
    file = Path(path)
    try:
        size = file.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise InvalidRequest(f"{name}: {size / 1e6:.1f} MB is too large; send at most "
                                 f"{MAX_INPUT_BYTES / 1e6:.0f} MB.", name)
        return file.read_bytes()
    except OSError:
        raise InvalidRequest(f"{name}: the uploaded file is gone (uploads expire after an hour); upload it "
                             f"again.", name) from None


def editor_image_and_mask(editor: Any, uploaded_mask: Any) -> tuple[Any, Any]:
    """The picture and the mask of the Inpaint tab: the editor's background, and the uploaded mask if one
    was given, else the painted strokes (their alpha: white where painted)."""
    editor = editor if isinstance(editor, dict) else {}
    image = file_bytes("image", editor.get("background"))
    if image is None:
        return None, file_bytes("mask", uploaded_mask)
    if uploaded_mask is not None:
        return image, file_bytes("mask", uploaded_mask)
    layers = [layer for layer in editor.get("layers") or [] if layer]
    painted = [load_picture("mask", file_bytes("mask", layer)) for layer in layers]
    if not painted:
        raise InvalidRequest("mask: nothing is painted; paint over the part to repaint, or upload a mask.", "mask")
    return image, strokes_mask(painted)


def strokes_mask(layers: list[Any]) -> Any:
    """One 'L' mask from the editor's layers: the strongest alpha of any layer at each pixel."""
    from PIL import Image, ImageChops

    mask = None
    for layer in layers:
        alpha = layer.convert("RGBA").getchannel("A")
        if mask is not None and alpha.size != mask.size:
            raise InvalidRequest(f"mask: the painted layers differ in size ({alpha.size} and {mask.size}); "
                                 f"clear the canvas and paint again.", "mask")
        mask = alpha if mask is None else ImageChops.lighter(mask, alpha)
    if mask.getextrema()[1] == 0:
        raise InvalidRequest("mask: nothing is painted; paint over the part to repaint, or upload a mask.", "mask")
    return Image.frombytes("L", mask.size, mask.tobytes())

