"""The exp_avg_sq extraction tool, and the curvature methods end to end from a real optimizer."""
import pytest
import torch
from safetensors.torch import load_file

import fastmerge as fm
from fastmerge.cli import main
from fastmerge.cli.second_moments import extract_exp_avg_sq


def _trained(tmp_path, seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    model[2].bias.requires_grad_(False)  # frozen parameters are not in the optimizer
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 6)).square().sum().backward()
        opt.step()
    path = tmp_path / f"optimizer{seed}.pt"
    torch.save(opt.state_dict(), path)
    return model, opt, path


def test_extract_maps_indices_to_names(tmp_path):
    model, opt, path = _trained(tmp_path, 0)
    out = extract_exp_avg_sq(path, model, tmp_path / "v.safetensors")
    assert list(out) == ["0.weight", "0.bias", "2.weight"]
    params = [p for p in model.parameters() if p.requires_grad]
    for name, p in zip(out, params):
        assert torch.equal(out[name], opt.state[p]["exp_avg_sq"])
    assert set(load_file(tmp_path / "v.safetensors")) == set(out)


def test_extract_errors_name_the_problem(tmp_path):
    model, _, path = _trained(tmp_path, 1)
    with pytest.raises(ValueError, match="3 parameters but the model lists 2"):
        extract_exp_avg_sq(path, ["a", "b"])
    with pytest.raises(ValueError, match="'0.weight': exp_avg_sq has shape"):
        extract_exp_avg_sq(path, model, shapes={"0.weight": (6, 5)})
    bad = tmp_path / "bad.pt"
    torch.save({"not": "an optimizer"}, bad)
    with pytest.raises(ValueError, match="not a torch optimizer state_dict"):
        extract_exp_avg_sq(bad, model)


def test_cli_with_names_file(tmp_path, capsys):
    model, _, path = _trained(tmp_path, 2)
    names = tmp_path / "names.txt"
    names.write_text("0.weight\n0.bias\n2.weight\n")
    out = tmp_path / "m.safetensors"
    assert main(["extract-second-moments", str(path), "--model", str(names), "--out", str(out),
                 "--suffix", ".exp_avg_sq"]) == 0
    assert "weights_only=True" in capsys.readouterr().out
    assert "0.weight.exp_avg_sq" in load_file(out)


def test_ota_ffg_from_extracted_moments(tmp_path):
    base = torch.nn.Linear(6, 5)
    tunes, moments = [], []
    for seed in (3, 4):
        model, _, path = _trained(tmp_path, seed)
        tunes.append(model[0].weight.detach())
        moments.append(extract_exp_avg_sq(path, model)["0.weight"])
    out = fm.merge_tensors(base.weight.detach(), tunes, "ota_ffg", density=0.5,
                           second_moments=moments, backend="torch")
    from fastmerge.testing import assert_matches_reference
    assert_matches_reference(out, base.weight.detach(), tunes, "ota_ffg", density=0.5,
                             second_moments=moments)
