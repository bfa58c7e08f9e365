"""The latent contextual regressor H of cae.py (CAE Sec. 2.1) and cae_v2.py's own copy (CAE v2 Sec. 2.2) against
one hand-written formula (tests/regressor_formula.py), and against each other with the same weights."""
import random

import pytest
import torch

import cae
import cae_v2
import common
from regressor_formula import randomise, regressor_block_by_hand, regressor_by_hand


def split(batch=2, num_masked=98, seed=0):
    random.seed(seed)
    gen = common.BlockMaskGenerator(14, num_masked)
    return common.ids_from_mask(torch.stack([gen() for _ in range(batch)]), 196 - num_masked)


@pytest.mark.parametrize("module", [cae, cae_v2])
def test_regressor_block_equals_the_formula_per_head(module):
    torch.manual_seed(0)
    blk = randomise(module.RegressorBlock(32, 4, layer_scale=0.1))
    x, z_v, pos_m, pos_v = torch.randn(2, 5, 32), torch.randn(2, 7, 32), torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(blk(x, z_v, pos_m, pos_v), regressor_block_by_hand(blk, x, z_v, pos_m, pos_v),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("module", [cae, cae_v2])
def test_whole_regressor_equals_the_formula(module):
    """Mask-token queries at the masked positions, sin-cos positions, 2 blocks; CAE closes with an LN, CAE v2 not."""
    torch.manual_seed(0)
    reg = randomise(module.LatentContextualRegressor(32, 2, 4, 14, layer_scale=0.1))
    ids_keep, ids_mask = split(num_masked=30)  # ViT-T's 30 masked of 196
    z_v = torch.randn(2, 166, 32)
    with torch.no_grad():
        expected = regressor_by_hand(reg, z_v, ids_keep, ids_mask, final_norm=getattr(reg, "norm", None))
        torch.testing.assert_close(reg(z_v, ids_keep, ids_mask), expected, atol=5e-5, rtol=5e-5)
    assert hasattr(reg, "norm") == (module is cae)  # CAE v2 Sec. 2.2 / released: no final LN


def test_cae_v2_regressor_is_cae_s_without_the_final_ln():
    """The copy in cae_v2.py has CAE's parameter names, and with CAE's weights it computes CAE's H before its LN."""
    torch.manual_seed(0)
    ref = randomise(cae.LatentContextualRegressor(32, 2, 4, 14, layer_scale=0.1))
    copy = cae_v2.LatentContextualRegressor(32, 2, 4, 14, layer_scale=0.1).eval()
    missing, unexpected = copy.load_state_dict(ref.state_dict(), strict=False)
    assert missing == [] and set(unexpected) == {"norm.weight", "norm.bias"}
    ids_keep, ids_mask = split()
    z_v = torch.randn(2, 98, 32)
    with torch.no_grad():
        torch.testing.assert_close(ref(z_v, ids_keep, ids_mask), ref.norm(copy(z_v, ids_keep, ids_mask)))
