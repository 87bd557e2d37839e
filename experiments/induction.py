"""
Does the model learn to copy by content (an induction head), and how fast?

    python experiments/induction.py                    # tiny shape, smeared keys (preset default)
    python experiments/induction.py --no_smear_keys    # plain keys, for comparison

Each sequence is random tokens, a separator, then a 6-token segment copied from a random
place earlier in the sequence. The loss is on segment tokens 2..6, which can only be
predicted by finding the earlier occurrence of the current token and reading the next one.
Chance level is ln(vocab). Prints the loss every 100 steps.
"""

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import GPT, GPTConfig  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--vocab", type=int, default=200)
p.add_argument("--n_layer", type=int, default=4)
p.add_argument("--steps", type=int, default=1201)
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--batch_size", type=int, default=32)
p.add_argument("--no_smear_keys", action="store_true")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

torch.manual_seed(args.seed)
V, T, L, B = args.vocab, 60, 6, args.batch_size
model = GPT(GPTConfig(vocab_size=V, block_size=128, n_layer=args.n_layer, n_head=4, n_embd=128,
                      n_hidden=512, smear_keys=not args.no_smear_keys))
opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
t0 = time.time()
for step in range(args.steps):
    x = torch.randint(2, V, (B, T))
    pos = torch.randint(0, T - L - 12, (B,))
    seg = torch.stack([x[b, pos[b]:pos[b] + L] for b in range(B)])
    x = torch.cat([x, torch.ones(B, 1, dtype=torch.long), seg], 1)   # token 1 = separator
    logits = model.head(model.hidden(x[:, :-1])[:, T + 1:])          # predictions for seg[1:]
    loss = F.cross_entropy(logits.reshape(-1, V), x[:, T + 2:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 100 == 0:
        print(f"step {step} | loss {loss.item():.3f} | {time.time() - t0:.0f}s", flush=True)
