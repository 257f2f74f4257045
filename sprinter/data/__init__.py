"""Stage 1: the data stage: draft states and accept labels collected from a pair (`collect`, `contexts`),
on disk as shards (`shards`)."""
