"""A CIFAR-10 style classifier trained the way DeepSpeed's CIFAR tutorial does it, with only the
import changed (``import shardwise as deepspeed``). The data are synthetic 3x16x16 images whose
labels come from a fixed random teacher network (no downloads), so the loss goes down.

    shardwise run --nproc-per-node 2 examples/deepspeed_style/cifar.py \\
        --deepspeed --deepspeed_config examples/deepspeed_style/ds_config_cifar.json
"""
import argparse
import json

import torch
import torch.nn as nn
import torch.nn.functional as F

import shardwise as deepspeed
from shardwise.accelerator import get_accelerator


def add_argument():
    parser = argparse.ArgumentParser(description="CIFAR-like")
    parser.add_argument("--epochs", type=int, default=2, help="passes over the data")
    parser.add_argument("--samples", type=int, default=256, help="synthetic images")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    parser.add_argument("--out", default=None, help="rank 0 writes the per-step mean losses here (JSON)")
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 3)
        self.fc1 = nn.Linear(16 * 2 * 2, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def synthetic_cifar(samples: int, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(samples, 3, 16, 16, generator=g)
    teacher = torch.randn(3 * 16 * 16, 10, generator=g)
    labels = (images.flatten(1) @ teacher).argmax(1)
    return torch.utils.data.TensorDataset(images, labels)


def main():
    args = add_argument()
    deepspeed.init_distributed()
    torch.manual_seed(0)  # the same initial model on every rank
    net = Net()
    trainset = synthetic_cifar(args.samples)
    parameters = filter(lambda p: p.requires_grad, net.parameters())
    model_engine, optimizer, trainloader, __ = deepspeed.initialize(
        args=args, model=net, model_parameters=parameters, training_data=trainset)

    local_device = get_accelerator().device_name(model_engine.local_rank)
    local_rank = model_engine.local_rank
    target_dtype = None
    if model_engine.bfloat16_enabled():
        target_dtype = torch.bfloat16
    elif model_engine.fp16_enabled():
        target_dtype = torch.half

    criterion = nn.CrossEntropyLoss()
    losses, step_loss, micro = [], 0.0, 0
    for epoch in range(args.epochs):
        running_loss = 0.0
        for i, data in enumerate(trainloader):
            inputs, labels = data[0].to(local_device), data[1].to(local_device)
            if target_dtype is not None:
                inputs = inputs.to(target_dtype)
            outputs = model_engine(inputs)
            loss = criterion(outputs, labels)
            model_engine.backward(loss)
            model_engine.step()
            running_loss += loss.item()
            step_loss += loss.item()
            micro += 1
            if micro == model_engine.gradient_accumulation_steps():
                mean = torch.tensor([step_loss / micro], dtype=torch.float64)
                deepspeed.comm.all_reduce(mean)  # DeepSpeed's comm API, for logging
                losses.append(mean.item() / deepspeed.comm.get_world_size())
                step_loss, micro = 0.0, 0
            if local_rank <= 0 and i % 8 == 7:
                print(f"[{epoch + 1}, {i + 1:3d}] loss: {running_loss / 8:.3f}", flush=True)
                running_loss = 0.0
    if deepspeed.comm.get_rank() == 0:
        print(f"finished: {model_engine.global_steps} steps, stage {model_engine.zero_optimization_stage()}, "
              f"last loss {losses[-1]:.4f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"losses": losses, "steps": model_engine.global_steps}, f)


if __name__ == "__main__":
    main()
