"""DemoBlocks: a gr.Blocks whose launch() brings the app's look, upload limit, login and login limit.

In Gradio 6, css, theme, auth and max_file_size are launch() arguments (gradio/blocks.py,
`Blocks.launch`; the constructor's css/theme are deprecated there). A host that imports `app.demo`
and calls `demo.launch()` itself (Hugging Face Spaces, `gradio app.py`) would launch without them;
here they are launch()'s defaults, so every launch has them and a caller's own arguments still win.
"""

from __future__ import annotations

import inspect
from typing import Any

import gradio as gr
from starlette.middleware import Middleware

from ui.login_limit import LoginLimiter, LoginRateLimit

# The app takes pictures (image to image, inpaint, PNG Info), and Gradio's /gradio_api/upload route is
# open to every visitor and keeps what it gets: refuse more than a phone's photo (delete_cache, set in
# app.build_demo, drops the rest after an hour). 10 MiB (gradio/utils.py FileSize: 1024-based) is below
# input_images.MAX_INPUT_BYTES, so an upload Gradio takes is never too large for the request.
MAX_UPLOAD = "10mb"
CSS = """
#banner {border-radius: 8px; padding: 10px 14px; background: var(--block-background-fill);}
#tiny-warning {border: 2px solid #d97706; background: #fef3c7; color: #78350f; border-radius: 8px;
               padding: 10px 14px; font-weight: 600;}
/* min-height: the progress bar shows over the latency panel (app.wire_generate), with its text. */
.latency-panel {font-variant-numeric: tabular-nums; min-height: 90px;}
"""
_LAUNCH = inspect.signature(gr.Blocks.launch)


class DemoBlocks(gr.Blocks):
    """gr.Blocks with the app's launch() defaults: CSS, theme, footer, upload limit, auth, login limit."""

    def __init__(self, *, auth: tuple[str, str] | None = None, login_limiter: LoginLimiter | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.default_auth = auth
        self.login_limiter = login_limiter or LoginLimiter()

    def launch_defaults(self) -> dict[str, Any]:
        """What launch() uses for each of these arguments its caller leaves out."""
        return dict(css=CSS, theme=gr.themes.Soft(), footer_links=["api", "gradio"], max_file_size=MAX_UPLOAD,
                    auth=self.default_auth)

    def launch(self, *args: Any, **kwargs: Any):
        """gr.Blocks.launch, with launch_defaults() for the arguments not given, and failed logins limited."""
        arguments = _LAUNCH.bind_partial(self, *args, **kwargs).arguments
        arguments.pop("self")
        arguments = {**self.launch_defaults(), **arguments}
        if arguments.get("auth") is not None:
            app_kwargs = dict(arguments.get("app_kwargs") or {})
            app_kwargs["middleware"] = [*app_kwargs.get("middleware", []),
                                        Middleware(LoginRateLimit, limiter=self.login_limiter)]
            arguments["app_kwargs"] = app_kwargs
        return super().launch(**arguments)
