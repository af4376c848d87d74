"""The aggregator command's flags map onto the configuration keys one to one."""

from __future__ import annotations

import inspect

from edgefl.aggregator.cli import aggregator_command, flag_overrides
from edgefl.aggregator.config_file import FLAGS


def _defaults() -> dict[str, object]:
    """The command's parameters as typer passes them when no flag is given."""
    params = inspect.signature(aggregator_command).parameters
    return {name: p.default for name, p in params.items() if name != "ctx"}


def test_no_flag_given_overrides_nothing() -> None:
    overrides = flag_overrides(_defaults())

    assert set(overrides) == set(FLAGS)
    assert {k: v for k, v in overrides.items() if v is not None} == {}


def test_each_flag_sets_its_key() -> None:
    params = _defaults() | {
        "buffer_size": 7, "round_deadline": 3.0, "topk": 0.1, "verbose": True,
        "tls_insecure": True, "no_fsync": True, "signing_key": "k.pem",
    }  # fmt: skip

    overrides = flag_overrides(params)

    assert {k: v for k, v in overrides.items() if v is not None} == {
        "aggregation.buffer_size": 7,
        "aggregation.round_deadline_s": 3.0,
        "hints.topk_fraction": 0.1,
        "log_level": "DEBUG",
        "broker.tls_insecure": True,
        "limits.fsync": False,
        "security.signing_key_file": "k.pem",
    }
