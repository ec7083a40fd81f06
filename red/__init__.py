"""red: RED distillation engine."""
