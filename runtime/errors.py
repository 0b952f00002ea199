"""Errors a user can cause. CLIs print them as one line and exit non-zero, with no traceback."""


class SgexError(Exception):
    """A user-facing error: bad input, bad artifact, missing optional dependency."""


class UnknownName(SgexError, KeyError):
    """A task, variant or other table name that does not exist. A KeyError too (table lookups),
    printed as its plain message, not KeyError's quoted repr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MissingDependency(SgexError):
    """An optional library is not installed; the message says which extra installs it."""

    def __init__(self, what: str, extra: str, detail: str = ""):
        hint = f"pip install -c constraints.txt 'sgex[{extra}]'"
        super().__init__(f"{what} is not installed ({hint}){': ' + detail if detail else ''}")


def require(module: str, extra: str, what: str | None = None):
    """Import `module` or raise MissingDependency naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(what or module, extra, str(e)) from None
