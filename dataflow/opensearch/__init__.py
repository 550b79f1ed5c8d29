"""OpenSearch `rank_feature` support indices: the pure update logic (`updates`), the sink
that sends it (`sink`) and the index tool (`index`, `python -m dataflow.opensearch.index`)."""
