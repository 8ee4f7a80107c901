"""`ava-bench`: side-by-side benchmarks of Ava's MoE layer and training step against their peers."""
