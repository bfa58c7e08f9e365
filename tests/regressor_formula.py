"""CAE's latent contextual regressor H written out by hand (CAE Sec. 2.1; CAE v2 Sec. 2.2 reuses it without the
final LN), with explicit per-head loops: the one formula that both cae.py's and cae_v2.py's regressors must equal."""
import math

import torch
import torch.nn.functional as F


def layer_norm(t, norm):
    mu, var = t.mean(-1, keepdim=True), t.var(-1, unbiased=False, keepdim=True)
    return (t - mu) / torch.sqrt(var + 1e-6) * norm.weight + norm.bias


def regressor_block_by_hand(blk, x, z_v, pos_m, pos_v):
    """X + g1 CA(q = LN_q(X + P_m), k = LN_k([Z_v; X] + [P_v; P_m]), v = LN_v([Z_v; X])), LN2, + g2 MLP, per head."""
    a, D, H = blk.attn, x.shape[-1], blk.attn.num_heads
    dh = D // H
    kv, pos_kv = torch.cat([z_v, x], 1), torch.cat([pos_v, pos_m], 1)
    qi, ki, vi = layer_norm(x + pos_m, blk.norm_q), layer_norm(kv + pos_kv, blk.norm_k), layer_norm(kv, blk.norm_v)
    out = torch.zeros_like(x)
    for b in range(len(x)):
        heads = []
        for h in range(H):
            r = slice(h * dh, (h + 1) * dh)
            q = qi[b] @ a.q.weight[r].T + a.q.bias[r]
            k = ki[b] @ a.k.weight[r].T
            v = vi[b] @ a.v.weight[r].T + a.v.bias[r]
            heads.append(torch.softmax(q @ k.T / math.sqrt(dh), -1) @ v)
        out[b] = torch.cat(heads, -1) @ a.proj.weight.T + a.proj.bias
    x = layer_norm(x + blk.ls1.gamma * out, blk.norm2)
    hidden = F.gelu(x @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias)
    return x + blk.ls2.gamma * (hidden @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias)


def sincos_row(p_row, p_col, dim):
    """MAE's 2-D sin-cos position of patch (row, col), from the formula: column in the first half of the channels."""
    w = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    return torch.cat([torch.sin(p_col * w), torch.cos(p_col * w), torch.sin(p_row * w), torch.cos(p_row * w)]).float()


def regressor_by_hand(reg, z_v, ids_keep, ids_mask, grid=14, final_norm=None):
    """H: queries start as the mask token at every masked patch; each block reads [Z_v; X] with positions of
    the patches (row = i // grid, col = i % grid); final_norm: CAE's closing LN (None: CAE v2's, none)."""
    dim = z_v.shape[-1]
    pos = lambda ids: torch.stack([torch.stack([sincos_row(i // grid, i % grid, dim) for i in row.tolist()])
                                   for row in ids])  # [B, L, D]
    pos_v, pos_m = pos(ids_keep), pos(ids_mask)
    x = reg.mask_token.expand(len(z_v), ids_mask.shape[1], -1)
    for blk in reg.blocks:
        x = regressor_block_by_hand(blk, x, z_v, pos_m, pos_v)
    return layer_norm(x, final_norm) if final_norm is not None else x


def randomise(module, scale=0.3):
    """Non-trivial LN affines, layer scales and biases (a fresh init has many ones and zeros); the fixed sin-cos
    positions (requires_grad False) stay as they are."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return module.eval()
