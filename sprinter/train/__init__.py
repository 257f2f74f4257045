"""Stage 2: training the verifier: shards as batches (`data`), the Lightning wrapper and loop (`fit`),
calibration (`calibrate`) and the baselines it must beat (`baselines`)."""
