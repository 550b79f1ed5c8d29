"""Streaming CTR and popularity features for search ranking.

Kafka interaction events flow through a Bytewax dataflow into a Redis feature store
(read with `dataflow.reader.FeatureReader`) and an OpenSearch `rank_feature` index.
The maths lives in pure modules (`keys`, `events`, `windows`, `counters`, `smoothing`,
`families`, `dedup`); `flow`, `sinks` and `config` are the edge.
"""

__version__ = "0.1.0"
