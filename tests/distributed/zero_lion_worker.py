"""One rank of tests/distributed/test_zero_lion.py: a small regression trained with ppo_fast's
Lion8bit as DeepSpeed's client optimizer (ZeRO stage from the DeepSpeed config), over gloo."""

import json
import sys

import torch
from _workers import shut_down
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from ppo_fast.optim import Lion8bit


def main(out_path: str) -> None:
    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    torch.manual_seed(0)
    # 64*192 + 192 + 192 + 1 = 12,865 parameters: each rank's flat fp32 partition (> 4096 elements)
    # gets 8-bit momentum.
    model = torch.nn.Sequential(torch.nn.Linear(64, 192), torch.nn.Tanh(), torch.nn.Linear(192, 1))
    optimizer = Lion8bit(model.parameters(), lr=3e-3, weight_decay=0.0)
    model, optimizer = acc.prepare(model, optimizer)
    g = torch.Generator().manual_seed(1 + acc.process_index)
    w_true = torch.randn(64, 1, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(40):
        x = torch.randn(8, 64, generator=g)
        y = torch.tanh(x @ w_true)
        loss = torch.nn.functional.mse_loss(model(x), y)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # The state Lion8bit keeps for the flat partition it was handed.
    inner = optimizer.optimizer
    while hasattr(inner, "optimizer") and not isinstance(inner, Lion8bit):
        inner = inner.optimizer
    dtypes = sorted({str(s["momentum"].dtype) for s in inner.state.values() if "momentum" in s})
    flat = torch.cat([p.detach().float().flatten() for p in acc.unwrap_model(model).parameters()])
    json.dump(
        {
            "rank": acc.process_index,
            "world": acc.num_processes,
            "first": sum(losses[:5]) / 5,
            "last": sum(losses[-5:]) / 5,
            "momentum_dtypes": dtypes,
            "param_sum": flat.double().sum().item(),
            "param_abs": flat.double().abs().sum().item(),
        },
        open(f"{out_path}.{acc.process_index}", "w"),
    )
    shut_down(acc)


if __name__ == "__main__":
    main(sys.argv[1])
