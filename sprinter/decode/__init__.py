"""Stage 3: decoding: the `Decoder` API (`decoder`), its loops (single-prompt, `batched`, `asynchronous`),
drafters, gates and the acceptance rules."""
