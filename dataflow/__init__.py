"""Streaming CTR and popularity features for search ranking.

Kafka interaction events flow through a Bytewax dataflow into a Redis feature store (read
with `dataflow.reader.FeatureReader`) and OpenSearch `rank_feature` indices.

- `dataflow.core`: the pure maths and state (no Kafka, Redis, OpenSearch or Bytewax).
- `dataflow.kafka`: the input edge (source wrappers, offsets, lag, topics).
- `dataflow.sinks`: the Redis feature store and the dead-letter topic.
- `dataflow.opensearch`: the `rank_feature` updates, their sink and the index tool.
- `dataflow.tools`: the demo, replay into a new prefix, and the event generator.
- `flow` wires the dataflow; `run` starts it; `config`, `settings`, `metrics`, `logs` and
  `errors` serve everything.
"""

__version__ = "0.1.0"
