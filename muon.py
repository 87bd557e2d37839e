"""
Muon for the weight matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable for LLM training"):
momentum SGD whose update, for each 2-D weight matrix, is replaced by the nearest
semi-orthogonal matrix (all singular values set to ~1). A plain gradient step on a
matrix is dominated by a few directions; orthogonalising it gives every direction
the same step, which the papers measured as ~2x the compute efficiency of AdamW on
transformer pretraining. The orthogonalisation is five Newton-Schulz iterations of
a quintic whose coefficients (3.4445, -4.7750, 2.0315) were tuned by Jordan for
speed over precision: singular values land in ~[0.7, 1.2], which works as well.

The embedding (tied to the output head) and every 1-D parameter (norm gains,
biases, smear gates) stay with AdamW, as in the papers: their gradients are not
"directions of a linear map" in the same sense.

The learning rate of the loop (train.get_lr) is AdamW's; Muon's groups carry
lr_scale = muon_lr / lr and the loop multiplies (group["lr"] = lr * lr_scale), so
one schedule drives both.
"""

import torch


def orthogonalize(g, steps=5):
    """g (..., m, n) -> ~ U V^T of the SVD of each (m, n) matrix, by Newton-Schulz
    iterations in float32; a stack of matrices goes through in one batch."""
    x = g.float()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)     # singular values <= 1 to start
    tall = x.size(-2) > x.size(-1)
    if tall:                                    # iterate on the smaller Gram matrix
        x = x.mT
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Groups with muon=True: Muon (lr, momentum, nesterov, weight_decay);
    the others: AdamW (lr, betas, eps, weight_decay)."""

    def __init__(self, groups, lr, momentum=0.95, betas=(0.9, 0.95), eps=1e-8):
        super().__init__(groups, dict(lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=0.0,
                                      muon=False, lr_scale=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(params, group)
            else:
                for p in params:
                    self._adamw(p, self.state[p], group)

    def _muon(self, params, group):
        """One Muon step for these matrices. Matrices of one shape (a transposed
        one counts as the same) are orthogonalised as one stack: on a CPU the
        small matrix products of a tiny model cost more in calls than in work."""
        by_shape = {}
        for p in params:
            buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
            buf.mul_(group["momentum"]).add_(p.grad)
            g = p.grad.add(buf, alpha=group["momentum"])            # Nesterov
            tall = p.size(0) > p.size(1)
            by_shape.setdefault((min(p.shape), max(p.shape)), []).append((p, g.T if tall else g, tall))
        for same in by_shape.values():
            for (p, _, tall), o in zip(same, orthogonalize(torch.stack([g for _, g, _ in same]))):
                # scaled so a tall and a wide matrix move their outputs alike (Jordan's rule)
                scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((o.T if tall else o).to(p.dtype), alpha=-group["lr"] * scale)

    @staticmethod
    def _adamw(p, state, group):
        if not state:
            state["step"] = 0
            state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
        b1, b2 = group["betas"]
        state["step"] += 1
        state["m"].mul_(b1).add_(p.grad, alpha=1 - b1)
        state["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
        m_hat = state["m"] / (1 - b1 ** state["step"])
        v_hat = state["v"] / (1 - b2 ** state["step"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])


def muon_groups(model, weight_decay, muon_lr, lr):
    """The model's parameters split for MuonAdamW: the transformer blocks' (and the
    copy head's) matrices to Muon, the embedding and 1-D parameters to AdamW."""
    muon, adam_decay, adam_plain = [], [], []
    for name, p in model.named_parameters():
        if p.dim() == 2 and min(p.shape) > 1 and not name.startswith("embed"):
            muon.append(p)
        elif p.dim() >= 2:
            adam_decay.append(p)
        else:
            adam_plain.append(p)
    return [{"params": muon, "muon": True, "weight_decay": weight_decay, "lr_scale": muon_lr / lr},
            {"params": adam_decay, "weight_decay": weight_decay},
            {"params": adam_plain, "weight_decay": 0.0}]
