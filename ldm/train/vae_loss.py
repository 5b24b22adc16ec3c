"""Stage-1 autoencoder losses, as in LDM's `LPIPSWithDiscriminator` minus LPIPS.

reconstruction (L1 and/or L2, summed per sample) + kl_weight * KL, plus, once the discriminator is
switched on, an adversarial hinge term weighted adaptively by the ratio of gradient norms at the
decoder's last layer. LPIPS is left out: its weights would have to be downloaded.

The discriminator uses GroupNorm instead of LDM's BatchNorm, so its output for a sample does not
depend on the rest of the batch (which keeps N-process training equal to one big batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ldm.train.config import VAELossConfig


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: a grid of real/fake logits, one per overlapping receptive field."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                     nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # the DCGAN initialisation LDM uses
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def logits_without_param_grads(disc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The discriminator's logits with gradients flowing to `x` only.

    The generator's adversarial term must not touch the discriminator's .grad (that holds the
    discriminator's own loss), and toggling requires_grad under DDP breaks its reducer: running the
    module with detached parameters does neither.
    """
    params = {n: p.detach() for n, p in disc.named_parameters()}
    return functional_call(disc, params, (x,))


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """|grad rec| / |grad g| at the decoder's output conv: balances the two terms whatever their scale."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, cfg: VAELossConfig) -> torch.Tensor:
    """Per-sample sums averaged over the batch: the normalisation LDM's kl_weight of 1e-6 assumes."""
    diff = (x.float() - recon.float())
    loss = torch.zeros((), device=x.device)
    if cfg.l1_weight > 0:
        loss = loss + cfg.l1_weight * diff.abs().flatten(1).sum(1).mean()
    if cfg.l2_weight > 0:
        loss = loss + cfg.l2_weight * diff.pow(2).flatten(1).sum(1).mean()
    return loss
