"""CPU-scale demo: a synthetic multi-step reasoning task and a bundled tiny teacher."""
