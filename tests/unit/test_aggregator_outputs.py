"""Signed updates and manifests (edgefl.security), held-out evaluation and ONNX publication."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_aggregator_service import (
    FLEET,
    MODEL,
    Harness,
    delta,
    make_config,
    retained_model,
    run,
)
from waiting import eventually

from edgefl.aggregator.updates import build_update_envelope
from edgefl.codec import CodecConfig, Quantization
from edgefl.protocol import (
    ModelManifest,
    decode_message,
    manifest_topic,
    model_chunk_topic,
    update_topic,
)
from edgefl.protocol.topics import ModelArtifact
from edgefl.transport import MemoryBroker


def test_signed_updates_are_authenticated_and_manifests_signed(tmp_path: Path) -> None:
    import edgefl.security as security

    keys = tmp_path / "device-keys"
    keys.mkdir()
    device_key = security.generate_private_key()
    security.write_public_key(keys / "good.pub", device_key.public_key())
    aggregator_key = tmp_path / "aggregator.pem"
    security.write_private_key(aggregator_key, security.generate_private_key())
    config = make_config(
        tmp_path,
        buffer_size=1,
        authenticator=security.load_update_authenticator(keys),
        manifest_signer=security.load_signer(aggregator_key),
    )
    verifier = security.Ed25519ManifestVerifier(
        [security.load_private_key(aggregator_key).public_key()]
    )
    device_signer = security.Ed25519Signer(device_key)
    broker = MemoryBroker()

    def envelope(device: str, seq: int) -> bytes:
        return build_update_envelope(
            fleet=FLEET, model=MODEL, device=device, seq=seq, base_version=0, delta=delta(seq),
            codec=CodecConfig(quantization=Quantization.FP32),
        )  # fmt: skip

    async def body() -> None:
        async with Harness(broker, config) as h:
            verifier.verify(broker.retained()[manifest_topic(FLEET)])  # version 0 is signed
            dev = h.device
            await dev.publish(update_topic(FLEET, "good", 1), envelope("good", 1), qos=1)
            other = security.Ed25519Signer(security.generate_private_key())
            forged = other.sign(envelope("good", 2))
            await dev.publish(update_topic(FLEET, "good", 2), forged, qos=1)
            signed_unknown = device_signer.sign(envelope("stranger", 1))
            await dev.publish(update_topic(FLEET, "stranger", 1), signed_unknown, qos=1)
            await dev.publish(
                update_topic(FLEET, "good", 3), device_signer.sign(envelope("good", 3)), qos=1
            )
            s = await h.until(lambda s: s.received == 4)
            assert s.applied == 1
            assert s.version == 1
            assert dict(s.rejected) == {"bad_signature": 2, "unknown_device": 1}
            await eventually(
                lambda: (
                    decode_message(broker.retained()[manifest_topic(FLEET)], ModelManifest).version
                    == 1
                )
            )
            verifier.verify(broker.retained()[manifest_topic(FLEET)])

    run(body)


@pytest.mark.slow
def test_evaluation_and_onnx_publication(tmp_path: Path) -> None:
    """With eval_dataset and publish_onnx (both import torch, lazily), every version gets an
    accuracy in history (the newest at least) and an ONNX graph next to its weights."""
    from edgefl.models import get_model_spec
    from edgefl.models.onnx_export import OnnxPredictor

    config = make_config(tmp_path, buffer_size=1, eval_dataset="digits", publish_onnx=True)
    broker = MemoryBroker()

    async def body() -> None:
        async with Harness(broker, config) as h:
            await h.send("a", 1, 0, delta(1, scale=0.05))
            await h.until(lambda s: s.version == 1)
            # latest wins: version 0 may be skipped when version 1 arrives first
            await eventually(lambda: h.agg.history()[-1].accuracy is not None, 60)
            await eventually(
                lambda: (
                    decode_message(broker.retained()[manifest_topic(FLEET)], ModelManifest).version
                    == 1
                ),
                30,
            )
            history = h.agg.history()
            stats = h.stats()
        assert [r.version for r in history] == [0, 1]
        assert history[-1].accuracy is not None
        assert 0.0 <= history[-1].accuracy <= 1.0
        assert stats.last_accuracy == history[-1].accuracy
        manifest = decode_message(broker.retained()[manifest_topic(FLEET)], ModelManifest)
        assert manifest.onnx is not None
        graph = b"".join(
            _chunk_data(
                broker.retained()[model_chunk_topic(FLEET, 1, i, artifact=ModelArtifact.ONNX)]
            )
            for i in range(manifest.onnx.num_chunks)
        )
        import torch

        from edgefl.models.torch_models import build_module, load_flat

        spec = get_model_spec(MODEL)
        _, weights = retained_model(broker)
        module = build_module(spec)
        load_flat(module, weights)
        x = np.random.default_rng(0).standard_normal((3, *spec.input_shape)).astype(np.float32)
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(OnnxPredictor(graph).logits(x), expected, atol=1e-4)

    run(body)


def _chunk_data(packet: bytes) -> bytes:
    from edgefl.protocol import decode_chunk, decode_envelope

    return bytes(decode_chunk(decode_envelope(packet, max_payload=1 << 20)).data)
