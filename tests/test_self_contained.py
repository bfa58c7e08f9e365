"""Each method file reads alone with common.py beside it (imports), says in --help what its defaults are and
that they assume 8 GPUs, and CAE / CAE v2 initialise as the released CAE code does."""
import ast
import math
import os
import sys

import pytest
import torch

import cae
import cae_v2
import common
from conftest import ROOT

METHODS = ["milan", "cae", "cae_v2", "mr_mae", "mask_align"]
ALLOWED = {"torch", "torchvision", "numpy", "PIL", "open_clip", "tqdm", "common"}


def imported_modules(path):
    """Top-level package of every import statement anywhere in the file (also inside functions)."""
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            raise AssertionError(f"{path}: dynamic import at line {node.lineno}")
    return names


@pytest.mark.parametrize("method", METHODS)
def test_method_file_imports_only_stdlib_torch_and_common(method):
    names = imported_modules(os.path.join(ROOT, f"{method}.py"))
    others = {n for n in names if n not in ALLOWED and n not in sys.stdlib_module_names}
    assert not others, f"{method}.py imports {others}: copy what it needs into the file (or common.py)"
    assert "common" in names and not names & set(METHODS)  # never another method file


def test_the_import_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nimport common\ndef f():\n    from cae import RegressorBlock\n")
    assert imported_modules(str(bad)) == {"os", "common", "cae"}


@pytest.mark.parametrize("method,cites", [
    ("milan", "App. A.1"), ("cae", "App. A"), ("cae_v2", "Table 8"), ("mr_mae", "Sec. 4.1"), ("mask_align", "Sec. 4.1")])
def test_help_names_every_default_the_8_gpu_batch_and_the_recipe(method, cites, capsys):
    module = __import__(method)
    with pytest.raises(SystemExit) as e:
        module.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0
    assert "(default: None)" not in text  # a None default is resolved later: the help says to what
    assert "8 GPUs" in text and "x 8 =" in text and cites in text


def flag_help(module, flag, capsys):
    with pytest.raises(SystemExit):
        module.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    return text.split(flag + " ")[2].split(" --")[0]  # usage line first, then the option's own entry


@pytest.mark.parametrize("method,flag,says", [
    ("cae_v2", "--mask_ratio", "0.15/0.25/0.5/0.6"), ("cae_v2", "--drop_path", "0.1/0.1/0.1/0.2"),
    ("cae_v2", "--regressor_depth", "1/1/4/4"), ("cae_v2", "--regressor_dim", "96/384/768/1024"),
    ("mask_align", "--drop_path", "0.2 for vit_large_patch16"), ("milan", "--decoder_dim", "512"),
    ("mr_mae", "--decoder_depth", "8"), ("cae", "--layer_scale", "1e-5 for ViT-L/H")])
def test_help_says_what_a_size_dependent_default_resolves_to(method, flag, says, capsys):
    assert says in flag_help(__import__(method), flag, capsys)


# ---------------------------------------------------------------------------------------------
# Init as the released CAE code (Atten4Vis/CAE modeling_cae_helper.py): truncated normal, std 0.02, cut at +-0.02
# ---------------------------------------------------------------------------------------------
def truncated_std(std=0.02, cut=1.0):
    """Standard deviation of N(0, std^2) truncated to [-cut std, cut std]: std sqrt(1 - 2 c phi(c) / (2 Phi(c) - 1))."""
    phi, Phi = math.exp(-cut * cut / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(cut / math.sqrt(2)))
    return std * math.sqrt(1 - 2 * cut * phi / (2 * Phi - 1))  # 0.0108 for std 0.02, cut 1


def cae_model():
    return cae.CAE(common.build_vit("vit_nano_patch16", 224, init_values=0.1), 8192, 2, 2, 0.0)


def cae_v2_model():
    return cae_v2.CAEv2(common.build_vit("vit_nano_patch16", 224, init_values=0.1), 32, None, 2, 0.0)


@pytest.mark.parametrize("build", [cae_model, cae_v2_model])
def test_cae_patch_embedding_and_tokens_start_as_released(build):
    torch.manual_seed(0)
    model = build()
    w, b = model.encoder.patch_embed.proj.weight, model.encoder.patch_embed.proj.bias  # [64, 3, 16, 16]
    assert w.abs().max() <= 0.02 and torch.all(b == 0)
    assert abs(w.std().item() - truncated_std()) < 0.05 * truncated_std()  # 49k values: within 5%
    for token in [model.encoder.cls_token, model.regressor.mask_token]:  # 64 values each
        assert token.abs().max() <= 0.02 and token.std() > 0.005
    # the student's other MAE-init parts are untouched: xavier linears (bound sqrt(6 / (64 + 192)) for qkv)
    qkv = model.encoder.blocks[0].attn.qkv.weight
    assert qkv.abs().max() > 0.1 and qkv.abs().max() <= math.sqrt(6 / (64 + 192)) + 1e-6


def test_mae_init_is_kept_elsewhere():
    """common.ViT's own init (MILAN, MR-MAE, MaskAlign follow MAE) is not changed: xavier patch projection."""
    torch.manual_seed(0)
    w = common.build_vit("vit_nano_patch16", 224).patch_embed.proj.weight
    assert w.abs().max() > 0.05  # xavier bound sqrt(6 / (768 + 64)) = 0.085, far outside +-0.02


SECTIONS = ["Arguments", "Sampler", "Model", "Loss", "Training"]


@pytest.mark.parametrize("method", METHODS)
def test_one_skeleton(method):
    """The same sections in the same order in every method file (so that `diff cae.py cae_v2.py` shows the method);
    main() wraps the student in DDP itself (the run reads top to bottom in the file); no private argparse API; one
    gather (common.gather) for tokens at patch indices; per_patch, not per_token; common.py's equations are named in
    the header."""
    text = open(os.path.join(ROOT, f"{method}.py")).read()
    tree = ast.parse(text)
    assert [line[7:].split(":")[0] for line in text.splitlines() if line.startswith("# ---- ")] == SECTIONS
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert "DDP(model)" in ast.get_source_segment(text, main) and "train_one_epoch(" in ast.get_source_segment(text, main)
    assert "_option_string_actions" not in text and "per_token" not in text
    assert "[..., None].expand(-1, -1" not in text and not any(
        isinstance(n, ast.FunctionDef) and n.name == "gather" for n in tree.body)
    assert "Computed in common.py: " in ast.get_docstring(tree)
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("# ---- "))
    assert not any(isinstance(n, ast.Assign) and n.lineno < first for n in tree.body)  # constants under their section


def test_mr_mae_arch_choices_are_its_convvit_sizes():
    import mr_mae
    with pytest.raises(SystemExit):
        mr_mae.get_args(["--data", "fake", "--arch", "convvit_giant"])
    for arch in ["vit", *mr_mae.CONVVIT_CONFIGS]:
        assert mr_mae.get_args(["--data", "fake", "--arch", arch]).arch == arch


def test_readme_is_short_and_leaves_measurements_to_benchmarks():
    """README.md: the user's page, at most 20,000 bytes, its first screen the set-up, smoke and ImageNet commands;
    measurements live in benchmarks/README.md; no figure that goes stale with every commit."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert len(readme.encode()) <= 20000 and "benchmarks/README.md" in readme
    first = "\n".join(readme.splitlines()[:30])
    assert "pip install -r requirements.txt" in first and "python -m pytest -q tests" in first
    assert "--data fake" in first and "torchrun --nproc_per_node=8 milan.py --data /imagenet" in first
    assert not any(word in readme for word in (" tests take", " passed", "issue 1", "issue 2"))
    assert os.path.isfile(os.path.join(ROOT, "benchmarks", "README.md"))
