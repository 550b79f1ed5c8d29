"""The Kafka edge: the source and its wrappers (offset gaps, consumer lag), broker offsets
and topic administration."""
