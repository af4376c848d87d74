"""edgefl: asynchronous federated learning (FedBuff) for fleets of edge and IoT devices over MQTT.

The library both sides share: wire protocol, update codec, aggregation, transport, models, data,
the aggregator service and the command line. Torch is imported lazily, only by code that trains.
"""

__version__ = "0.1.0"
