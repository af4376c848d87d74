"""Server-controlled participation in the aggregator (PROTOCOL.md §4.7), over the in-memory
broker: check-in -> lease -> update accepted; no lease -> refused and receipted; at most C
leases; expiry frees the slot; a restart restores the leases; the flush deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from commit_gate import gated_commits
from test_aggregator_service import FLEET, FP32, MODEL, Harness, delta, make_config, run
from waiting import eventually

from edgefl.aggregator.updates import build_update_packets
from edgefl.participation import ParticipationConfig
from edgefl.protocol import ServerState, decode_message, server_state_topic
from edgefl.protocol.messages import (
    FEATURE_LEASES,
    CheckIn,
    DeviceState,
    DeviceStatus,
    Lease,
    Receipt,
    encode_message,
)
from edgefl.protocol.topics import checkin_topic, device_state_topic, lease_topic, receipt_topic
from edgefl.transport import MemoryBroker, MemoryTransport


def leasing(tmp_path: Path, **participation: Any) -> Any:
    """A test config with participation on (``participation`` overrides its fields)."""
    overrides = {k: participation.pop(k) for k in list(participation) if k == "buffer_size"}
    return make_config(tmp_path, participation=ParticipationConfig(**participation), **overrides)


class Fleet:
    """The devices' side: check-ins out, the LEASE messages in (one subscription to all)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.transport = MemoryTransport(broker, "fleet-devices")
        self.leases: list[Lease] = []
        self.topics: list[str] = []
        self.payloads: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Fleet:
        await self.transport.connect()
        await self.transport.subscribe(lease_topic(FLEET, "x").replace("/x/", "/+/"), qos=1)
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.transport.close()

    async def _read(self) -> None:
        async for message in self.transport.messages():
            self.topics.append(message.topic)
            self.payloads.append(message.payload)
            self.leases.append(decode_message(message.payload, Lease))

    async def check_in(self, device: str, *, available: bool = True) -> None:
        msg = CheckIn(fleet=FLEET, device_id=device, at=time.time(), available=available)
        await self.transport.publish(checkin_topic(FLEET, device), encode_message(msg), qos=1)

    def lease_of(self, device: str) -> Lease | None:
        mine = [lease for lease in self.leases if lease.device_id == device]
        return mine[-1] if mine else None

    async def send(self, device: str, seq: int, lease_id: int | None, base: int = 0) -> None:
        topic, packets = build_update_packets(
            fleet=FLEET, model=MODEL, device=device, seq=seq, base_version=base,
            delta=delta(seq), codec=FP32, lease_id=lease_id,
        )  # fmt: skip
        for p in packets:
            await self.transport.publish(topic, p, qos=1)


def receipt(broker: MemoryBroker, device: str) -> Receipt | None:
    payload = broker.retained().get(receipt_topic(FLEET, device))
    return None if payload is None else decode_message(payload, Receipt)


def server_state(broker: MemoryBroker) -> ServerState:
    return decode_message(broker.retained()[server_state_topic(FLEET)], ServerState)


def participation(h: Harness) -> Any:
    p = h.stats().participation
    assert p is not None
    return p


async def until(predicate: Callable[[], bool]) -> None:
    await eventually(predicate, what="participation condition")


def run_with_leases(
    tmp_path: Path, scenario: Callable[[Harness, Fleet], Awaitable[None]], **participation: Any
) -> None:
    """Run ``scenario`` against an aggregator with participation on and a fleet of devices."""
    broker = MemoryBroker()
    config = leasing(tmp_path, **participation)

    async def body() -> None:
        async with Harness(broker, config) as h, Fleet(broker) as fleet:
            await scenario(h, fleet)

    run(body)


# --------------------------------------------------------------------------- the whole flow


def test_check_in_lease_update_is_accepted_and_ends_the_lease(tmp_path: Path) -> None:
    async def scenario(h: Harness, fleet: Fleet) -> None:
        state = server_state(h.broker)
        assert FEATURE_LEASES in state.features
        assert state.participation is not None
        assert (state.participation.concurrency, state.participation.lease_s) == (2, 600.0)
        # Act: check in, wait for the lease, train under it
        await fleet.check_in("pi-1")
        await until(lambda: fleet.lease_of("pi-1") is not None)
        lease = fleet.lease_of("pi-1")
        assert lease is not None
        assert (lease.lease_id, lease.version, fleet.topics) == (
            1,
            0,
            [lease_topic(FLEET, "pi-1")],
        )
        assert 590.0 < lease.ttl_s <= 600.0
        assert participation(h).in_flight == 1
        await fleet.send("pi-1", 0, lease.lease_id)
        # Assert: accepted, the lease completed, the slot free again
        s = await h.until(lambda s: s.applied == 1)
        assert s.rejected == {}
        p = participation(h)
        assert (p.in_flight, dict(p.ended), dict(p.verdicts)) == (
            0,
            {"completed": 1},
            {"valid": 1},
        )
        await until(lambda: (r := receipt(h.broker, "pi-1")) is not None and r.through == 0)
        # the retained server state follows (rate-limited)
        await until(lambda: server_state(h.broker).participation.in_flight == 0)  # type: ignore[union-attr]

    run_with_leases(tmp_path, scenario, concurrency=2, lease_s=600.0, buffer_size=10)


def test_an_update_without_a_valid_lease_is_refused_and_receipted(tmp_path: Path) -> None:
    async def scenario(h: Harness, fleet: Fleet) -> None:
        # no lease at all; then a lease used twice; then someone else's lease
        await fleet.send("pi-1", 0, None)
        await until(lambda: receipt(h.broker, "pi-1") is not None)
        assert dict(receipt(h.broker, "pi-1").rejected) == {0: "no_lease"}  # type: ignore[union-attr]
        await fleet.check_in("pi-1")
        await until(lambda: fleet.lease_of("pi-1") is not None)
        lease_id = fleet.lease_of("pi-1").lease_id  # type: ignore[union-attr]
        await fleet.send("pi-1", 1, lease_id)
        await fleet.send("pi-1", 2, lease_id)
        await fleet.check_in("pi-2")
        await until(lambda: fleet.lease_of("pi-2") is not None)
        await fleet.send("pi-3", 0, fleet.lease_of("pi-2").lease_id)  # type: ignore[union-attr]
        s = await h.until(lambda s: s.received == 4)
        assert (s.applied, s.rejected) == (1, {"no_lease": 3})
        await until(lambda: (r := receipt(h.broker, "pi-3")) is not None and bool(r.rejected))
        assert dict(receipt(h.broker, "pi-3").rejected) == {0: "no_lease"}  # type: ignore[union-attr]
        await until(lambda: 2 in receipt(h.broker, "pi-1").rejected)  # type: ignore[union-attr]
        r1 = receipt(h.broker, "pi-1")
        assert r1 is not None
        assert (r1.through, dict(r1.rejected)) == (1, {2: "no_lease"})  # the latest batch's
        assert participation(h).in_flight == 1  # pi-2 still holds its lease

    run_with_leases(tmp_path, scenario, concurrency=2, buffer_size=10)


def test_at_most_c_leases_and_a_completion_frees_a_slot(tmp_path: Path) -> None:
    async def scenario(h: Harness, fleet: Fleet) -> None:
        for i in range(5):
            await fleet.check_in(f"pi-{i}")
        await until(lambda: participation(h).candidates == 3 and len(fleet.leases) == 2)
        assert participation(h).in_flight == 2
        first = fleet.leases[0]
        await fleet.send(first.device_id, 0, first.lease_id)
        await until(lambda: len(fleet.leases) == 3)
        assert participation(h).in_flight == 2
        assert len({lease.device_id for lease in fleet.leases}) == 3
        assert [lease.lease_id for lease in fleet.leases] == [1, 2, 3]

    run_with_leases(tmp_path, scenario, concurrency=2, buffer_size=10)


def test_an_expired_lease_frees_its_slot_and_an_update_under_it_is_refused(
    tmp_path: Path,
) -> None:
    """pi-1 never delivers: the expiry timer frees the slot, pi-2 gets it, and pi-1's update
    under the expired lease is refused with a final, receipted reason."""

    async def scenario(h: Harness, fleet: Fleet) -> None:
        await fleet.check_in("pi-1")
        await until(lambda: len(fleet.leases) == 1)
        await fleet.check_in("pi-2")
        await until(lambda: fleet.lease_of("pi-2") is not None)
        assert dict(participation(h).ended) == {"expired": 1}
        await fleet.send("pi-1", 0, fleet.leases[0].lease_id)
        s = await h.until(lambda s: s.received == 1)
        assert s.rejected == {"lease_expired": 1}
        await until(lambda: receipt(h.broker, "pi-1") is not None)
        assert dict(receipt(h.broker, "pi-1").rejected) == {0: "lease_expired"}  # type: ignore[union-attr]

    run_with_leases(tmp_path, scenario, concurrency=1, lease_s=1.0, lease_grace=0.0)


def test_a_withdrawal_frees_the_slot_and_an_update_finished_before_it_counts_once(
    tmp_path: Path,
) -> None:
    """The chaos case of a broker dying with an acknowledged update: pi-1 finished its update
    under its lease, the broker lost it, and pi-1 withdrew (unplugged) before resending it. The
    withdrawal frees the slot at once (pi-2 gets it); the resent update is accepted once
    (``late``), a second one under the same lease is refused."""

    async def scenario(h: Harness, fleet: Fleet) -> None:
        await fleet.check_in("pi-1")
        await until(lambda: len(fleet.leases) == 1)
        await fleet.check_in("pi-2")
        await fleet.check_in("pi-1", available=False)
        await until(lambda: fleet.lease_of("pi-2") is not None)
        assert dict(participation(h).ended) == {"released": 1}
        await fleet.send("pi-1", 0, fleet.leases[0].lease_id)
        await fleet.send("pi-1", 1, fleet.leases[0].lease_id)
        s = await h.until(lambda s: s.received == 2)
        assert s.rejected == {"no_lease": 1}
        await until(lambda: (r := receipt(h.broker, "pi-1")) is not None and bool(r.rejected))
        r = receipt(h.broker, "pi-1")
        assert r is not None
        assert (r.through, dict(r.rejected)) == (0, {1: "no_lease"})  # seq 0 committed
        assert dict(participation(h).verdicts) == {"late": 1, "no_lease": 1}

    run_with_leases(tmp_path, scenario, concurrency=1, lease_s=600.0, lease_grace=0.0)


# --------------------------------------------------------------------------- restarts


def test_a_restart_restores_leases_and_candidates_and_grants_no_more_than_c(
    tmp_path: Path,
) -> None:
    """Leases and check-ins are durable: after a restart both leases are held again (no slot
    for the two waiting devices), a restored lease is honoured, and its slot goes to a waiting
    device that did not check in again."""
    broker = MemoryBroker()
    config = leasing(tmp_path, concurrency=2, buffer_size=10)

    async def body() -> None:
        async with Fleet(broker) as fleet:
            async with Harness(broker, config) as h:
                for i in range(4):
                    await fleet.check_in(f"pi-{i}")
                await until(lambda: len(fleet.leases) == 2 and participation(h).candidates == 2)
            async with Harness(broker, config) as h:
                assert (participation(h).in_flight, participation(h).candidates) == (2, 2)
                first = fleet.leases[0]
                await fleet.send(first.device_id, 0, first.lease_id)
                await h.until(lambda s: s.applied == 1)
                await until(lambda: len(fleet.leases) == 3)
                third = fleet.leases[2]
                assert third.lease_id == 3
                assert third.device_id not in {lease.device_id for lease in fleet.leases[:2]}
                assert (participation(h).in_flight, participation(h).candidates) == (2, 1)

    run(body)


def test_a_crash_in_the_commit_keeps_the_lease_and_counts_the_update_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The completion of a lease commits in the transaction of the update that completed it:
    when that transaction fails after the lease rows were written (a crash before its COMMIT),
    the lease is still held after the restart, and the redelivered update completes it, once."""
    broker = MemoryBroker()
    config = leasing(tmp_path, concurrency=1, buffer_size=10)
    from edgefl.aggregator.store import StateStore

    real_write = StateStore._write_leases
    crash = {"armed": False}

    def write_then_crash(self: StateStore, batch: Any) -> None:
        real_write(self, batch)
        if crash["armed"] and batch.accepted:
            raise OSError("simulated crash before the COMMIT")

    monkeypatch.setattr(StateStore, "_write_leases", write_then_crash)

    async def body() -> None:
        async with Fleet(broker) as fleet:
            h = await Harness(broker, config).__aenter__()
            await fleet.check_in("pi-1")
            await until(lambda: len(fleet.leases) == 1)
            crash["armed"] = True
            await fleet.send("pi-1", 0, fleet.leases[0].lease_id)
            with pytest.raises(ExceptionGroup):  # the OSError of the failed commit
                await asyncio.wait_for(h.task, 10)
            await h.device.close()
            crash["armed"] = False
            async with Harness(broker, config) as h:
                s = await h.until(lambda s: s.applied == 1)
                assert s.rejected == {}
                p = participation(h)
                assert (p.in_flight, dict(p.verdicts)) == (0, {"valid": 1})  # it survived

    run(body)


def test_a_lease_is_published_only_after_its_grant_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(h: Harness, fleet: Fleet) -> None:
        await fleet.check_in("pi-1")
        await asyncio.to_thread(gate.entered.wait, 10)
        # Assert: granted in memory, its commit in progress: nothing published yet
        assert participation(h).in_flight == 1
        for _ in range(50):
            await asyncio.sleep(0)
        assert fleet.leases == []
        gate.opened.set()
        await until(lambda: len(fleet.leases) == 1)

    with gated_commits(
        monkeypatch,
        lambda batch: batch.participation is not None and bool(batch.participation.granted),
    ) as gate:
        run_with_leases(tmp_path, scenario, concurrency=1)
    assert gate.entered.is_set()  # the commit was held


# --------------------------------------------------------------------------- liveness


def test_a_single_update_steps_at_the_flush_deadline(tmp_path: Path) -> None:
    async def scenario(h: Harness, fleet: Fleet) -> None:
        await fleet.check_in("pi-1")
        await until(lambda: len(fleet.leases) == 1)
        await fleet.send("pi-1", 0, fleet.leases[0].lease_id)
        s = await h.until(lambda s: s.version == 1)
        assert (s.applied, s.buffer_fill) == (1, 0)

    run_with_leases(tmp_path, scenario, concurrency=20, flush_after_s=0.2, buffer_size=10)


def _liveness(tmp_path: Path, devices: int) -> None:
    """``devices`` devices that each check in again after every update (K = 10, C = 20):
    the model moves whatever the fleet size."""
    broker = MemoryBroker()
    config = leasing(tmp_path, concurrency=20, flush_after_s=0.5, buffer_size=10)

    async def device_loop(fleet: Fleet, h: Harness, name: str) -> None:
        seq = 0
        while h.stats().version < 2:
            await fleet.check_in(name)
            before = fleet.lease_of(name)
            await until(lambda b=before: fleet.lease_of(name) is not b)  # type: ignore[misc]
            lease = fleet.lease_of(name)
            assert lease is not None
            await fleet.send(name, seq, lease.lease_id, base=h.stats().version)
            await until(lambda s=seq: (r := receipt(broker, name)) is not None and r.through == s)  # type: ignore[misc]
            seq += 1

    async def body() -> None:
        async with Harness(broker, config) as h, Fleet(broker) as fleet:
            loops = [device_loop(fleet, h, f"pi-{i}") for i in range(devices)]
            await asyncio.wait_for(asyncio.gather(*loops), 60)
            s = h.stats()
            assert s.version >= 2
            assert "no_lease" not in s.rejected

    run(body)


def test_one_device_moves_the_model(tmp_path: Path) -> None:
    _liveness(tmp_path, 1)


def test_three_devices_move_the_model(tmp_path: Path) -> None:
    _liveness(tmp_path, 3)


def test_ten_devices_move_the_model(tmp_path: Path) -> None:
    _liveness(tmp_path, 10)


def test_participation_off_takes_updates_without_leases(tmp_path: Path) -> None:
    broker = MemoryBroker()
    config = make_config(tmp_path, buffer_size=10)

    async def body() -> None:
        async with Harness(broker, config) as h, Fleet(broker) as fleet:
            assert FEATURE_LEASES not in server_state(broker).features
            assert server_state(broker).participation is None
            await fleet.check_in("pi-1")
            await fleet.send("pi-1", 0, None)
            s = await h.until(lambda s: s.applied == 1)
            assert (s.rejected, s.participation) == ({}, None)
            for _ in range(20):
                await asyncio.sleep(0)
            assert fleet.leases == []

    run(body)


# --------------------------------------------------------------------------- signatures


def test_signed_check_ins_and_signed_leases(tmp_path: Path) -> None:
    """With device keys, a check-in counts only when its device signed it (refusals counted
    by reason); with a signing key, every LEASE is signed by the aggregator."""
    from edgefl.protocol import EnvelopeKind
    from edgefl.security import Ed25519ManifestVerifier, Ed25519Signer, generate_private_key
    from edgefl.security.keys import write_public_key
    from edgefl.security.signing import KeyDirectoryAuthenticator

    keys = tmp_path / "device-keys"
    keys.mkdir()
    device_key, other_key, agg_key = (generate_private_key() for _ in range(3))
    write_public_key(keys / "pi-1.pub", device_key.public_key())
    config = leasing(tmp_path, concurrency=5).replace(
        authenticator=KeyDirectoryAuthenticator(keys), manifest_signer=Ed25519Signer(agg_key)
    )
    broker = MemoryBroker()

    async def signed_check_in(fleet: Fleet, device: str, key: Any) -> None:
        msg = CheckIn(fleet=FLEET, device_id=device, at=time.time())
        payload = encode_message(msg, signer=None if key is None else Ed25519Signer(key))
        await fleet.transport.publish(checkin_topic(FLEET, device), payload, qos=1)

    async def body() -> None:
        async with Harness(broker, config) as h, Fleet(broker) as fleet:
            await signed_check_in(fleet, "pi-1", None)  # unsigned
            await signed_check_in(fleet, "pi-1", other_key)  # someone else's key
            await signed_check_in(fleet, "pi-2", device_key)  # no key registered for pi-2
            await until(lambda: sum(participation(h).checkins.values()) == 3)
            assert dict(participation(h).checkins) == {"bad_signature": 2, "unknown_device": 1}
            assert fleet.leases == []
            await signed_check_in(fleet, "pi-1", device_key)
            await until(lambda: fleet.lease_of("pi-1") is not None)
            verifier = Ed25519ManifestVerifier([agg_key.public_key()], kinds=(EnvelopeKind.LEASE,))
            verifier.verify(fleet.payloads[0])
            assert dict(participation(h).checkins)["available"] == 1

    run(body)


# --------------------------------------------------------------------------- visible


def test_prometheus_and_server_metrics_show_the_leases_against_c(tmp_path: Path) -> None:
    from edgefl.aggregator.metrics import PrometheusExporter
    from edgefl.aggregator.runner import status_line
    from edgefl.aggregator.service import _server_metrics

    async def scenario(h: Harness, fleet: Fleet) -> None:
        for device in ("a", "b", "c"):
            await fleet.check_in(device)
        await until(lambda: len(fleet.leases) == 2 and participation(h).candidates == 1)
        idle = next(d for d in ("a", "b", "c") if fleet.lease_of(d) is None)
        await fleet.send(fleet.leases[0].device_id, 0, fleet.leases[0].lease_id)
        await fleet.send(idle, 0, None)
        await h.until(lambda s: s.received == 2)
        await until(lambda: len(fleet.leases) == 3)
        stats = h.stats()
        registry = PrometheusExporter(lambda: stats).registry
        value = registry.get_sample_value
        assert value("edgefl_aggregator_leases_in_flight") == 2
        assert value("edgefl_aggregator_lease_concurrency") == 2
        assert value("edgefl_aggregator_lease_candidates") == 0
        assert value("edgefl_aggregator_staleness_reference_versions") == 0.5  # C / K = 2 / 4
        assert value("edgefl_aggregator_leases_granted_total") == 3
        assert value("edgefl_aggregator_leases_ended_total", {"how": "completed"}) == 1
        assert value("edgefl_aggregator_leases_ended_total", {"how": "expired"}) == 0
        assert value("edgefl_aggregator_lease_verdicts_total", {"verdict": "valid"}) == 1
        assert value("edgefl_aggregator_lease_verdicts_total", {"verdict": "no_lease"}) == 1
        assert value("edgefl_aggregator_checkins_total", {"outcome": "available"}) == 3
        extra = _server_metrics(FLEET, stats).extra
        assert (extra["leases_in_flight"], extra["concurrency"]) == (2, 2)
        assert extra["staleness_reference"] == 0.5
        assert ", leases 2/2, " in status_line(h.agg)  # systemctl status

    run_with_leases(tmp_path, scenario, concurrency=2, buffer_size=4)


def test_the_flush_deadline_is_fedbuffs_only(tmp_path: Path) -> None:
    """FedAvg rounds have their own deadline: a flush deadline would never fire there, and an
    overdue one would make the ingest loop spin."""
    from edgefl.aggregator.engine import Engine
    from edgefl.aggregator.service import initial_state

    for algorithm, expected in (("fedbuff", 10.5), ("fedavg", None)):
        config = leasing(tmp_path, flush_after_s=0.5).replace(algorithm=algorithm)
        engine = Engine(config, initial_state(config), now=0.0)
        engine.add("pi-1", delta(1), base_version=0, num_examples=8, now=10.0)
        assert engine.flush_deadline == expected
        stepped = engine.tick(11.0) is not None
        assert (stepped, engine.version) == ((True, 1) if expected else (False, 0))


# --------------------------------------------------------------------------- presence


async def publish_state(fleet: Fleet, device: str, status: str, session: int) -> None:
    state = DeviceState(FLEET, device, DeviceStatus(status), session, time.time())
    topic = device_state_topic(FLEET, device)
    await fleet.transport.publish(topic, encode_message(state), qos=1, retain=True)


def test_a_device_whose_will_arrives_gives_back_its_lease_and_candidacy(tmp_path: Path) -> None:
    """pi-1 holds the only lease and pi-2 waits; pi-1's connection dies (the broker publishes
    its Will, status lost): its lease is released at once and pi-2 gets the slot, long before
    the lease would have expired. pi-3's candidacy goes the same way when it shuts down."""

    async def scenario(h: Harness, fleet: Fleet) -> None:
        await publish_state(fleet, "pi-1", "idle", 4)
        await fleet.check_in("pi-1")
        await until(lambda: len(fleet.leases) == 1)
        await fleet.check_in("pi-2")
        await fleet.check_in("pi-3")
        await until(lambda: participation(h).candidates == 2)

        await publish_state(fleet, "pi-1", "lost", 4)
        await until(lambda: len(fleet.leases) == 2)
        await publish_state(fleet, "pi-3" if fleet.leases[1].device_id == "pi-2" else "pi-2",
                            "offline", 1)  # fmt: skip

        await until(lambda: participation(h).candidates == 0)
        assert dict(participation(h).ended) == {"released": 1}
        assert dict(participation(h).checkins)["presence_gone"] == 2

    run_with_leases(tmp_path, scenario, concurrency=1, lease_s=600.0)


def test_a_late_will_of_an_older_connection_keeps_the_lease(tmp_path: Path) -> None:
    async def scenario(h: Harness, fleet: Fleet) -> None:
        await publish_state(fleet, "pi-1", "idle", 5)
        await fleet.check_in("pi-1")
        await until(lambda: len(fleet.leases) == 1)

        await publish_state(fleet, "pi-1", "lost", 4)  # the Will of session 4, after session 5
        await fleet.check_in("pi-2")
        await until(lambda: participation(h).candidates == 1)

        assert participation(h).in_flight == 1
        assert len(fleet.leases) == 1

    run_with_leases(tmp_path, scenario, concurrency=1, lease_s=600.0)


def test_an_update_spooled_before_the_device_died_is_accepted_after_its_lease_was_released(
    tmp_path: Path,
) -> None:
    """The chaos case: pi-1 spools an update under its lease and is SIGKILLed before delivering
    it; its Will releases the lease; the aggregator restarts; pi-1 comes back, checks in (a new
    lease) and resends the update under the released lease: accepted once, then the new lease."""
    broker = MemoryBroker()
    config = leasing(tmp_path, concurrency=1, lease_s=600.0, buffer_size=10)

    async def body() -> None:
        async with Fleet(broker) as fleet:
            async with Harness(broker, config) as h:
                await publish_state(fleet, "pi-1", "idle", 4)
                await fleet.check_in("pi-1")
                await until(lambda: len(fleet.leases) == 1)
                await publish_state(fleet, "pi-1", "lost", 4)
                await until(lambda: dict(participation(h).ended) == {"released": 1})
            async with Harness(broker, config) as h:
                await publish_state(fleet, "pi-1", "idle", 5)
                await fleet.check_in("pi-1")
                await until(lambda: len(fleet.leases) == 2)
                old, new = fleet.leases
                await fleet.send("pi-1", 0, old.lease_id)
                await fleet.send("pi-1", 1, old.lease_id)  # a second update under it: refused
                await fleet.send("pi-1", 2, new.lease_id)
                await until(lambda: (r := receipt(h.broker, "pi-1")) is not None and r.through == 2)
                assert dict(receipt(h.broker, "pi-1").rejected) == {1: "no_lease"}  # type: ignore[union-attr]
                assert dict(participation(h).verdicts) == {"late": 1, "no_lease": 1, "valid": 1}

    run(body)


@pytest.mark.parametrize(
    ("audience", "seconds"), [(0, 1.0), (200, 1.0), (400, 2.0), (2_000, 10.0), (1_000_000, 30.0)]
)
def test_the_participation_state_is_republished_less_often_for_big_fleets(
    audience: int, seconds: float
) -> None:
    from edgefl.aggregator.service import state_interval_s

    assert state_interval_s(audience) == seconds
