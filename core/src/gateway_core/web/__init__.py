"""The gateway's web UI: server-rendered pages for users and admins, served at ``/``.

Owns nothing itself: `add_web_ui` (in `gateway_core.web.pages`) adds the pages to the API app.
"""

from .pages import PLUGIN_INFOS, WEB_PATHS, add_web_ui

__all__ = ["PLUGIN_INFOS", "WEB_PATHS", "add_web_ui"]
