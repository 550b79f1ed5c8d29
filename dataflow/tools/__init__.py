"""Commands around the pipeline: `demo` (`make run`), `replay` into a new prefix, and the
seeded event `generator`."""
