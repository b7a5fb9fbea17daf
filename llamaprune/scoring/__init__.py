"""Phase 1, score: calibration hooks, in-memory, layer-streamed and sharded scoring, the pure importance math."""
