"""A GAN trained the way DeepSpeed's DCGAN tutorial does it, with only the import changed:
two engines built from client optimizers, the discriminator's two backward calls per step
(real, then fake), and the generator's loss whose backward also reaches the discriminator's
parameters (which the discriminator's ``zero_grad()`` then drops). Synthetic 2-D data.

    shardwise run --nproc-per-node 2 examples/deepspeed_style/gan.py \\
        --deepspeed_config examples/deepspeed_style/ds_config_gan.json
"""
import argparse
import json

import torch
import torch.nn as nn

import shardwise as deepspeed


class Generator(nn.Module):
    def __init__(self, nz: int = 4):
        super().__init__()
        self.main = nn.Sequential(nn.Linear(nz, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, z):
        return self.main(z)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.Linear(2, 32), nn.LeakyReLU(0.2), nn.Linear(32, 1))

    def forward(self, x):
        return self.main(x).view(-1)


def ring(samples: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(samples, generator=g) * 6.2832
    return torch.stack([angle.cos(), angle.sin()], 1) * 2 + 0.05 * torch.randn(samples, 2, generator=g)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--out", default=None)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()
    deepspeed.init_distributed()
    torch.manual_seed(999)
    netG, netD = Generator(), Discriminator()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=args.lr, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=args.lr, betas=(0.5, 0.999))
    model_engineD, optimizerD, _, _ = deepspeed.initialize(args=args, model=netD, model_parameters=netD.parameters(),
                                                           optimizer=optimizerD)
    model_engineG, optimizerG, _, _ = deepspeed.initialize(args=args, model=netG, model_parameters=netG.parameters(),
                                                           optimizer=optimizerG)
    rank, world = deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()
    per_rank = model_engineD.train_micro_batch_size_per_gpu()
    criterion = nn.BCEWithLogitsLoss()
    real_all = ring(per_rank * world * args.steps)
    noise_gen = torch.Generator().manual_seed(1)
    history = []
    for i in range(args.steps):
        lo = (i * world + rank) * per_rank
        real = real_all[lo:lo + per_rank]
        noise = torch.randn(per_rank * world, 4, generator=noise_gen)[rank * per_rank:(rank + 1) * per_rank]
        # (1) update D: maximise log(D(x)) + log(1 - D(G(z)))
        model_engineD.zero_grad()
        label = torch.full((per_rank,), 1.0)
        errD_real = criterion(model_engineD(real), label)
        model_engineD.backward(errD_real)
        fake = model_engineG(noise)
        label.fill_(0.0)
        errD_fake = criterion(model_engineD(fake.detach()), label)
        model_engineD.backward(errD_fake)
        model_engineD.step()
        # (2) update G: maximise log(D(G(z)))
        model_engineG.zero_grad()
        label.fill_(1.0)
        errG = criterion(model_engineD(fake), label)
        model_engineG.backward(errG)
        model_engineG.step()
        t = torch.tensor([errD_real.item() + errD_fake.item(), errG.item()], dtype=torch.float64)
        deepspeed.comm.all_reduce(t)
        history.append((t / world).tolist())
        if rank == 0:
            print(f"[{i + 1}/{args.steps}] Loss_D: {history[-1][0]:.4f} Loss_G: {history[-1][1]:.4f}", flush=True)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"losses": history, "steps": [model_engineD.global_steps, model_engineG.global_steps]}, f)


if __name__ == "__main__":
    main()
