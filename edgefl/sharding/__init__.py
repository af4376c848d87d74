"""Sharded aggregation with hierarchical FedBuff, sans-IO (docs/SCALING.md).

* :mod:`~edgefl.sharding.partitions`: the stable device -> partition hash and the owner check
  of a (partitioned, ``.../part/<k>/device/<id>/update/<seq>``, or plain) update topic; the
  topics themselves are :mod:`edgefl.protocol.topics`' (revision 1.3).
* :mod:`~edgefl.sharding.assignment`: partitions -> shards (rendezvous hashing), per-partition
  owner epochs, rebalancing when a shard dies; the retained assignment message.
* :mod:`~edgefl.sharding.partial`: a shard's pre-summed partial ``(A_s, W_s, count, staleness)``
  of one partition against one model version, and the shard-side accumulator.
* :mod:`~edgefl.sharding.root`: the root buffer that adds partials exactly once (ids, epoch
  fencing, per-device high-water) and steps like single-process FedBuff.
"""
