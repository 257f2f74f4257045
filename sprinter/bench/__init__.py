"""Stage 4: measuring. One protocol (`protocol`: prompts, warm-up, rotated order, the lossless check, records)
shared by the benchmark of every mode (`benchmark`, `report`), the batch sweep (`batch`) and the async benchmark
(`asynchronous`); data-stage throughput (`collect`) and fidelity metrics (`fidelity`)."""
