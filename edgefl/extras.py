"""Optional dependencies: which extra of the ``edgefl-mqtt`` distribution brings which module.

The core install (``pip install edgefl-mqtt``) runs a sensor-class agent, the aggregator and the
monitor's one-shot output. Everything else is an extra, imported only by the feature that needs
it. When such an import fails, the user must see one line naming the extra to install, never a
``ModuleNotFoundError`` traceback: :func:`require` does that at the call site, and
:func:`missing_extra_error` turns a ``ModuleNotFoundError`` that escaped anyway into the same
:class:`~edgefl.clierror.ConfigError` (exit 78).

The table below must match ``[project.optional-dependencies]`` in pyproject.toml
(``tests/unit/test_extras.py`` checks it).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Final

from edgefl.clierror import ConfigError

__all__ = [
    "DISTRIBUTION",
    "EXTRA_OF_MODULE",
    "ensure_installed",
    "install_hint",
    "missing_extra_error",
    "require",
]

DISTRIBUTION: Final = "edgefl-mqtt"
"""The name on the package index (``edgefl`` there is an unrelated project)."""

EXTRA_OF_MODULE: Final[dict[str, str]] = {
    "prometheus_client": "aggregator",
    "torch": "train",
    "onnxruntime": "infer",
    "onnx": "onnx",
    "sklearn": "eval",
    "mnist1d": "eval",
    "textual": "monitor",
    "amqtt": "broker",
    "cryptography": "security",
    "matplotlib": "sim",
}
"""Top-level import name of an optional dependency -> the extra that installs it."""


def install_hint(extra: str) -> str:
    """``"pip install 'edgefl-mqtt[train]'"``: the command that installs ``extra``."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def _message(module: str, extra: str, feature: str | None) -> str:
    what = f"{feature} needs" if feature else "this needs"
    return f"{what} the optional package {module!r}, which is not installed: {install_hint(extra)}"


def missing_extra_error(exc: BaseException, *, feature: str | None = None) -> ConfigError | None:
    """The one-line error for a ``ModuleNotFoundError`` of an optional dependency, else ``None``.

    ``None`` when ``exc`` is not a ``ModuleNotFoundError`` or names a module that no extra
    provides (a real bug, which must keep its own error).
    """
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    top = exc.name.partition(".")[0]
    extra = EXTRA_OF_MODULE.get(top)
    if extra is None:
        return None
    return ConfigError(_message(top, extra, feature))


def require(module: str, *, feature: str) -> ModuleType:
    """Import ``module`` (an optional dependency) or raise the one-line :class:`ConfigError`.

    ``feature`` names what needs it, e.g. ``"edgefl monitor's terminal UI"``. ``module`` must be
    a key of :data:`EXTRA_OF_MODULE` or a submodule of one.
    """
    top = module.partition(".")[0]
    if top not in EXTRA_OF_MODULE:
        raise ValueError(f"{module!r} is not an optional dependency of {DISTRIBUTION}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        err = missing_extra_error(exc, feature=feature)
        if err is None:  # a module missing *inside* the optional package: not ours to explain
            raise
        raise err from exc


def ensure_installed(*modules: str, feature: str, extra: str | None = None) -> None:
    """Raise the one-line :class:`ConfigError` unless every optional ``module`` is installed.

    Checks with :func:`importlib.util.find_spec`, without importing: for validating options at
    start-up (``--publish-onnx`` needs torch and onnx) before anything is written or started.
    ``extra`` names the extra to suggest when it is not the module's own (``edgefl sim`` needs
    torch, scikit-learn and matplotlib: suggest ``sim``, which brings all of them).
    """
    if extra is not None and extra not in set(EXTRA_OF_MODULE.values()) | {"dev"}:
        raise ValueError(f"{extra!r} is not an extra of {DISTRIBUTION}")
    for module in modules:
        top = module.partition(".")[0]
        if top not in EXTRA_OF_MODULE:
            raise ValueError(f"{module!r} is not an optional dependency of {DISTRIBUTION}")
        try:
            found = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):  # a finder that refuses it, or a broken module
            found = False
        if not found:
            raise ConfigError(_message(top, extra or EXTRA_OF_MODULE[top], feature))
