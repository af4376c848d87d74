"""``edgefl provision``: the command line of :mod:`edgefl.security.provision`.

``provision_app`` is a ``typer.Typer`` sub-app with two commands, ``init`` and ``device``, mounted
by ``edgefl/cli.py``. It lives outside :mod:`edgefl.security` and imports it only when a command
runs, so ``edgefl --help`` works on an install without the ``cryptography`` package (the
``security`` extra); running ``edgefl provision`` there says which extra to install.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Annotated

import typer

from edgefl.clierror import ConfigError, UsageError
from edgefl.errors import EdgeflError

__all__ = ["provision_app"]

provision_app = typer.Typer(
    name="provision",
    help="Create a fleet's CA, broker TLS/password/ACL files, signing keys and device bundles.",
    no_args_is_help=True,
)


def _provision_module() -> ModuleType:
    """:mod:`edgefl.security.provision`, or a clear error naming the extra that brings it."""
    try:
        import edgefl.security.provision as provision
    except ModuleNotFoundError as exc:
        if exc.name != "cryptography":
            raise
        from edgefl.extras import install_hint

        raise ConfigError(
            f"edgefl provision needs the 'cryptography' package: {install_hint('security')}"
        ) from None
    return provision


@contextlib.contextmanager
def _cli_errors(provision: ModuleType) -> Iterator[None]:
    """The CLI's errors of a provisioning step: a refused request is a UsageError, a problem
    of the ``--out`` tree a ConfigError."""
    try:
        yield
    except provision.ProvisionUsageError as exc:
        raise UsageError(str(exc)) from None
    except provision.ProvisionError as exc:
        raise ConfigError(f"--out: {exc}") from None
    except (ValueError, EdgeflError) as exc:
        raise UsageError(str(exc)) from None


def _check_name(option: str, value: str) -> None:
    """UsageError naming ``option`` unless ``value`` is an edgefl name (fleet, device id)."""
    from edgefl.errors import ProtocolError
    from edgefl.protocol.topics import validate_name

    try:
        validate_name(value, option)
    except ProtocolError:
        raise UsageError(
            f"{option} {value!r}: expected 1-64 characters [A-Za-z0-9_.-] starting with a letter"
            " or digit"
        ) from None


def _check_out(out: Path) -> None:
    """UsageError unless ``--out`` is a directory or can become one (nothing is created here)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r}: exists and is not a directory")


OutDir = Annotated[
    Path, typer.Option("--out", "-o", help="Provisioning directory (holds secrets: keep it safe).")
]


@provision_app.command("init")
def init_command(
    out: OutDir,
    fleet: Annotated[str, typer.Option(help="Fleet name ([A-Za-z0-9_.-], 1-64 characters).")],
    broker_host: Annotated[
        list[str],
        typer.Option(
            "--broker-host",
            help="Host name or IP address devices use for the broker (repeatable; the first one"
            " goes into device bundles; all go into the certificate).",
        ),
    ],
    port: Annotated[int, typer.Option(help="TLS listener port.")] = 8883,
    data_dir: Annotated[
        str, typer.Option(help="Mosquitto persistence directory on the broker host.")
    ] = "/var/lib/mosquitto",
    broker_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where the broker/ files will live on the broker host, e.g."
            " /etc/mosquitto/edgefl (paths in mosquitto.conf; default: <out>/broker)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing fleet in --out.")] = False,
) -> None:
    """Create a fleet: CA, broker TLS/passwords/ACL/config, aggregator and monitor accounts."""
    _check_name("--fleet", fleet)
    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    for host in broker_host:
        if not host or any(c.isspace() or c in "/@#?" for c in host):
            raise UsageError(f"--broker-host {host!r}: expected a host name or IP address")
    _check_out(out)
    provision = _provision_module()
    with _cli_errors(provision):
        layout = provision.init_fleet(
            out,
            fleet,
            broker_host,
            port=port,
            data_dir=data_dir,
            broker_dir=broker_dir,
            force=force,
        )
    typer.echo(f"fleet {fleet!r} provisioned in {layout.root}")
    typer.echo(
        f"  broker:     copy {layout.broker_dir}/ to the broker host; mosquitto.conf uses it"
    )
    typer.echo(f"  aggregator: copy {layout.aggregator_dir}/ to the aggregator host")
    typer.echo(
        f"  helper:     copy {layout.helper_dir}/ to a host of another operator "
        "(secure aggregation only)"
    )
    typer.echo(f"  CA key:     {layout.ca_dir / 'ca.key'} (keep offline)")
    typer.echo(f"next: edgefl provision device --out {layout.root} --device <id>")


@provision_app.command("device")
def device_command(
    out: OutDir,
    device: Annotated[str, typer.Option(help="Device id (= its MQTT username).")],
    client_cert: Annotated[
        bool, typer.Option(help="Also issue a TLS client certificate (CN = device id).")
    ] = False,
    data_path: Annotated[
        str, typer.Option(help="[data] path written into the bundle's agent.toml.")
    ] = "/var/lib/edgefl/data/train.npz",
    force: Annotated[bool, typer.Option(help="Re-provision an existing device.")] = False,
) -> None:
    """Add a device: MQTT password, Ed25519 key pair, optional client certificate, bundle."""
    _check_name("--device", device)
    _check_out(out)
    provision = _provision_module()
    with _cli_errors(provision):
        bundle = provision.add_device(
            out, device, client_cert=client_cert, force=force, data_path=data_path
        )
    typer.echo(f"device {device!r} provisioned (signing key id {bundle.key_id})")
    typer.echo(f"  bundle:     copy {bundle.directory}/ to /etc/edgefl/ on the device")
    typer.echo(f"  aggregator: {bundle.public_key_file} (picked up automatically)")
    typer.echo("  broker:     copy the updated broker/passwd and reload mosquitto (SIGHUP)")
