"""The pure core: events, keys, windows, counters, smoothing, fitted priors, feature families,
dedup, the autocomplete link, the state shards, and the versioned snapshots of their state.

Nothing here imports Kafka, Redis, OpenSearch or Bytewax, and nothing reads the clock:
time is passed in. That is what lets the reference model and Hypothesis test it whole.
"""
