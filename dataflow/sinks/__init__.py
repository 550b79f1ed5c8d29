"""Output partitions: the Redis feature store, the OpenSearch support index and the
dead-letter topic. Each module has setup (build), write_batch and close."""
