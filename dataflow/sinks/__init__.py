"""Output partitions: the Redis feature store and the dead-letter topic. Each module has
setup (build), write_batch and close. (The OpenSearch sink lives with its update logic in
`dataflow.opensearch`.)"""
