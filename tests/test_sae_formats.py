"""SAELens files both ways, against folders SAELens itself wrote and read
(tests/fixtures/saelens/make_fixtures.py): every field that changes the function is read with
its meaning or refused naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from circuits.sae.dictionaries import DictionaryConfig, SparseDictionary
from circuits.sae.formats import load_dictionary, load_saelens, load_vit_prisma, save_saelens

FIX = Path(__file__).parent / "fixtures" / "saelens"
THEIRS = sorted(p.name for p in (FIX / "theirs").iterdir() if p.name not in ("batchtopk_untrained", "expected_average"))
OURS = sorted(p.name for p in (FIX / "ours").iterdir())


def _tol(dtype):
    return dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", THEIRS)
def test_saelens_folders_read_identically(case):
    sae = load_saelens(FIX / "theirs" / case)
    want = load_file(FIX / "theirs" / case / "expected.safetensors")
    with torch.no_grad():
        acts, out = sae.encode(want["x"]), sae(want["x"])
    assert acts.dtype == want["acts"].dtype  # computed in the folder's dtype
    torch.testing.assert_close(acts, want["acts"], **_tol(acts.dtype))
    torch.testing.assert_close(out, want["out"], **_tol(out.dtype))
    assert torch.equal(acts > 0, want["acts"] > 0) or acts.dtype == torch.bfloat16  # same active set


def test_rescale_acts_by_decoder_norm_is_folded():
    """SAELens's TopKTrainingSAE default: its checkpoints are written unfolded, with unequal
    decoder norms; reading them as plain TopK would pick other features."""
    folder = FIX / "theirs" / "topk_rescale"
    cfg, t = json.loads((folder / "cfg.json").read_text()), load_file(folder / "sae_weights.safetensors")
    assert cfg["rescale_acts_by_decoder_norm"] and t["W_dec"].norm(dim=1).std() > 0.1
    want = load_file(folder / "expected.safetensors")
    sae = load_saelens(folder)
    torch.testing.assert_close(sae(want["x"]), want["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32), rtol=1e-5, atol=1e-5)
    ignored = dict(cfg, rescale_acts_by_decoder_norm=False)
    tmp = folder.parent.parent / "_ignored"
    try:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        (tmp / "cfg.json").write_text(json.dumps(ignored))
        assert (load_saelens(tmp)(want["x"]) - want["out"]).abs().max() > 1e-2  # the flag matters here
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_untrained_batchtopk_is_refused_not_dense(tmp_path):
    with pytest.raises(ValueError, match="topk_threshold is 0.0, i.e. never trained"):
        load_saelens(FIX / "theirs" / "batchtopk_untrained")


def test_expected_average_only_in_folds_the_scaler(tmp_path):
    folder = FIX / "theirs" / "expected_average"
    want = load_file(folder / "expected.safetensors")
    torch.testing.assert_close(load_saelens(folder)(want["x"]), want["out"], rtol=1e-5, atol=1e-5)
    shutil.copytree(folder, tmp_path / "f")
    (tmp_path / "f" / "activation_scaler.json").unlink()
    with pytest.raises(ValueError, match="expected_average_only_in.*scaling_factor="):
        load_saelens(tmp_path / "f")
    torch.testing.assert_close(load_saelens(tmp_path / "f", scaling_factor=2.5)(want["x"]), want["out"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("field, value, match", [
    ("normalize_activations", "covariance_whitening", "normalize_activations='covariance_whitening'"),
    ("reshape_activations", "hook_z", "reshape_activations='hook_z'"),
    ("hook_head_index", 2, "hook_head_index=2"),
    ("dtype", "int8", "dtype 'int8'"),
    ("architecture", "temporal", "architecture 'temporal'"),
])
def test_fields_that_change_the_function_are_refused(tmp_path, field, value, match):
    shutil.copytree(FIX / "theirs" / "standard", tmp_path / "f")
    cfg = json.loads((tmp_path / "f" / "cfg.json").read_text())
    (tmp_path / "f" / "cfg.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(ValueError, match=match):
        load_saelens(tmp_path / "f")


def test_unknown_tensors_and_negative_thresholds_are_refused(tmp_path):
    shutil.copytree(FIX / "theirs" / "jumprelu", tmp_path / "f")
    t = load_file(tmp_path / "f" / "sae_weights.safetensors")
    save_file({**t, "threshold": -t["threshold"]}, str(tmp_path / "f" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="negative JumpReLU thresholds"):
        load_saelens(tmp_path / "f")
    save_file({**t, "W_skip": torch.zeros(16, 16)}, str(tmp_path / "f" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"holds \['W_skip'\]"):
        load_saelens(tmp_path / "f")


@pytest.mark.parametrize("case", OURS)
def test_what_we_write_saelens_reads_identically(tmp_path, case):
    """ours/<case> was written by save_saelens and read by SAELens at fixture time; the writer
    still writes the same files, and we compute what SAELens computed from them."""
    folder = FIX / "ours" / case
    sae = load_saelens(folder)
    save_saelens(sae, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text()) == json.loads((folder / "cfg.json").read_text())
    mine, stored = load_file(tmp_path / "sae_weights.safetensors"), load_file(folder / "sae_weights.safetensors")
    assert mine.keys() == stored.keys() and all(torch.equal(mine[k], stored[k]) for k in stored)  # bit for bit
    want = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(want["x"]), want["acts"], **_tol(sae.dtype))
        torch.testing.assert_close(sae(want["x"]), want["out"], **_tol(sae.dtype))
    if "threshold" in want:  # JumpReLU thresholds: bit-exact as SAELens reads them
        assert torch.equal(sae.threshold, want["threshold"])


def test_untrained_batchtopk_is_written_as_topk_not_dense(tmp_path):
    cfg = json.loads((FIX / "ours" / "batchtopk_untrained" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4
    want = load_file(FIX / "ours" / "batchtopk_untrained" / "expected.safetensors")
    assert (want["acts"] > 0).sum(-1).max() <= 4  # SAELens's L0 on it


def test_jumprelu_threshold_bit_exact_through_save_and_load(tmp_path):
    sae = load_saelens(FIX / "theirs" / "jumprelu")
    theirs = load_file(FIX / "theirs" / "jumprelu" / "sae_weights.safetensors")["threshold"]
    assert torch.equal(sae.threshold, theirs)
    gen = torch.Generator().manual_seed(0)
    for dtype in ("float32", "bfloat16", "float16"):
        d = SparseDictionary(DictionaryConfig(8, 4096, "jumprelu", dtype=dtype))
        t = (torch.rand(4096, generator=gen) * 10 ** torch.randint(-6, 3, (4096,), generator=gen)).to(d.dtype)
        d.set_threshold_(t)
        save_saelens(d, tmp_path / dtype)
        back = load_saelens(tmp_path / dtype)
        assert torch.equal(back.threshold, t) and torch.equal(
            load_file(tmp_path / dtype / "sae_weights.safetensors")["threshold"], t)


def test_transcoders_keep_their_architecture_names(tmp_path):
    for case, arch in (("transcoder", "transcoder"), ("skip_transcoder", "skip_transcoder"),
                       ("jumprelu_transcoder", "jumprelu_transcoder")):
        cfg = json.loads((FIX / "ours" / case / "cfg.json").read_text())
        assert cfg["architecture"] == arch and cfg["d_out"] == 24 and cfg["apply_b_dec_to_input"] is False
        assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
        assert (FIX / "ours" / case / "saelens_class.txt").read_text().strip().lower() == arch.replace("_", "")
    for skip, arch in ((False, "topk_transcoder"), (True, "topk_skip_transcoder")):
        tc = SparseDictionary(DictionaryConfig(16, 32, "topk", k=4, hook_name="a", hook_out="b", d_out=24, skip=skip))
        with torch.no_grad():
            for p in tc.parameters():
                p.normal_()
        save_saelens(tc, tmp_path / arch)  # SAELens has no TopK transcoder: a name only hooked-vit reads
        assert json.loads((tmp_path / arch / "cfg.json").read_text())["architecture"] == arch
        back, x = load_saelens(tmp_path / arch), torch.randn(3, 16)
        assert back.cfg.is_transcoder and back.cfg.skip == skip
        torch.testing.assert_close(back(x), tc(x))


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale", "expected_average_only_in"])
def test_vit_prisma_normalize_activations(tmp_path, norm):
    """ViT-Prisma's normalize_activations means what SAELens's does (its sae.py): implemented,
    never loaded silently as none."""
    gen = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(8, 32, generator=gen), "b_enc": torch.randn(32, generator=gen),
         "W_dec": torch.randn(32, 8, generator=gen), "b_dec": torch.randn(8, generator=gen)}
    (tmp_path / "config.json").write_text(json.dumps({"d_in": 8, "d_sae": 32, "hook_point": "blocks.3.hook_resid_post",
                                                      "activation_fn_str": "relu", "normalize_activations": norm}))
    save_file(t, str(tmp_path / "weights.safetensors"))
    x = torch.randn(5, 8, generator=gen) * 3 + 1
    if norm == "layer_norm":
        mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
        xn, undo = (x - mu) / (std + 1e-5), lambda y: y * std + mu
    elif norm == "constant_norm_rescale":
        c = 8 ** 0.5 / x.norm(dim=-1, keepdim=True)
        xn, undo = x * c, lambda y: y / c
    else:
        with pytest.raises(ValueError, match="scaling_factor="):
            load_vit_prisma(tmp_path)
        xn, undo = x * 2.0, lambda y: y / 2.0
    want = undo(torch.relu((xn - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) @ t["W_dec"] + t["b_dec"])
    sae = load_dictionary(tmp_path, scaling_factor=2.0 if norm == "expected_average_only_in" else None)
    torch.testing.assert_close(sae(x), want, rtol=1e-5, atol=1e-5)


def test_gated_and_normalized_dictionaries_are_not_trained():
    for kw in (dict(architecture="gated"), dict(architecture="relu", normalize_activations="layer_norm")):
        with pytest.raises(ValueError, match="not trained here"):
            SparseDictionary(DictionaryConfig(8, 16, **kw)).train()
