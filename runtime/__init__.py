"""What a deployed app needs: buckets, manifests, `Engine` and its backends, image/video I/O,
`sgex-run`. Imports without torch; heavy libraries load inside functions.

`runtime.Engine` is resolved on first access so that `import runtime` stays light."""

__all__ = ["Engine"]


def __getattr__(name):
    if name == "Engine":
        from runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
