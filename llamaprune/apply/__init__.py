"""Phase 3, apply: slicing a checkpoint by a plan, error compensation (its math and the sequential refit)."""
