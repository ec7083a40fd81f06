"""A teacher with random weights made from a config: the benchmarks' stand-in for a real one."""
import torch


def random_teacher(config, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A frozen teacher with random weights made from a transformers ``config`` directly on
    ``device`` (no download, no host copy of the weights): for benchmarks only."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)
