"""HTTP serving of rewards (`ixc-engine serve`): needs the `serve` extra (Starlette, uvicorn, prometheus-client).

`create_app(engine, ServeConfig(...))` builds the ASGI app; `ixc_engine.serve.cli` holds the subcommand. Nothing here
is imported by the engine, and the optional libraries are imported when an app is built, not at package import.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("create_app", "ServeConfig"):
        from ixc_engine.serve import app

        return getattr(app, name)
    raise AttributeError(name)
