"""Key-value memories: values reconstruct the sublayers, planted memories are found, the
streamed per-image counts equal a direct computation, the statistics, the CLI and demo."""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from safetensors.torch import save_file

from circuits.data import ArrayDataset
from circuits.memories import (
    METRICS, agreement_by_layer, class_value_agreement, class_value_vs_random, class_value_vs_random_pooled,
    correct_vs_wrong, correct_vs_wrong_by_token, memory_values, permutation_test, random_classes,
)
from circuits.runs.memories import load_memory_results, memories
from helpers import images, make_timm, randomize_
from hooked_vit import HookedViT


# ------------------------------------------------------------------ values
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit3_small_patch16_224"])  # deit3: LayerScale
def test_values_times_coefficients_rebuild_the_sublayer_outputs(name):
    timm_model, size = make_timm(name, seed=1)
    model = HookedViT.from_timm(timm_model)
    _, cache = model.run_with_cache(images(size))
    act = model.blocks[0].mlp.act
    for layer in range(model.cfg.n_layers):
        mlp = torch.einsum("bpm,md->bpd", act(cache[f"blocks.{layer}.mlp.hook_pre"]), memory_values(model, "mlp")[layer])
        torch.testing.assert_close(mlp + model.b_out[layer], cache[f"blocks.{layer}.hook_mlp_out"], rtol=1e-4, atol=1e-4)
        z = cache[f"blocks.{layer}.attn.hook_z"].flatten(2)
        attn = torch.einsum("bpm,md->bpd", z, memory_values(model, "attn")[layer])
        torch.testing.assert_close(attn + model.b_O[layer], cache[f"blocks.{layer}.hook_attn_out"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ planted memories
N_CLASSES, PLANTED = 10, 5


def planted_model() -> HookedViT:
    """Layer 0's MLP holds, for each class c, memories 5c..5c+4 whose values are exactly the
    class embedding direction e_c and whose keys fire on the feature e_{10+c} that images of
    class c carry; every other memory is silent and orthogonal to all class embeddings."""
    timm_model, _ = make_timm("vit_tiny_patch16_224", seed=0)
    model = HookedViT.from_timm(timm_model)
    d, m = model.cfg.d_model, model.cfg.d_mlp
    eye = torch.eye(d)
    with torch.no_grad():
        model.embed.proj.weight.zero_()
        model.embed.proj.bias.zero_()
        model.embed.pos_embed.zero_()
        model.embed.cls_token.zero_()
        w = model.embed.proj.weight.view(d, -1)  # [d, 3 * 16 * 16]
        for c in range(N_CLASSES):
            w[N_CLASSES + c, c] = 5.0  # pixel c of each patch -> feature e_{10+c}
        attn = model.blocks[0].attn
        attn.proj.weight.zero_()  # attention writes nothing: the stream keeps the features
        attn.proj.bias.zero_()
        mlp, ln2 = model.blocks[0].mlp, model.blocks[0].ln2
        ln2.weight.fill_(1.0)
        ln2.bias.zero_()
        mlp.fc1.weight.zero_()
        mlp.fc1.bias.zero_()
        mlp.fc2.bias.zero_()
        gen = torch.Generator().manual_seed(0)
        other = torch.randn(d, m, generator=gen)
        other[: 2 * N_CLASSES] = 0  # orthogonal to every class embedding (and to the features)
        mlp.fc2.weight.copy_(other)
        for c in range(N_CLASSES):
            for j in range(PLANTED * c, PLANTED * (c + 1)):
                mlp.fc1.weight[j] = 10 * eye[N_CLASSES + c]
                mlp.fc2.weight[:, j] = 10 * eye[c]
        model.head.weight.copy_(eye[:N_CLASSES])  # class embedding of c = e_c
        model.head.bias.zero_()
        model.ln_final.weight.fill_(1.0)
        model.ln_final.bias.zero_()
    return model


def planted_data(n: int = 10) -> ArrayDataset:
    gen = torch.Generator().manual_seed(1)
    x = 0.01 * torch.randn(n, 3, 48, 48, generator=gen)
    labels = np.arange(n) % N_CLASSES
    for i, c in enumerate(labels):
        x[i, 0, c // 16 :: 16, c % 16 :: 16] += 1.0  # pixel c of every 16x16 patch (channel 0)
    return ArrayDataset(x.numpy(), labels)


def test_planted_memories_are_found(tmp_path):
    model = planted_model()
    memories(model, planted_data(), str(tmp_path), sublayers=("mlp",), batch_size=4, progress=False)
    res = load_memory_results(tmp_path)
    layer0 = agreement_by_layer(res.layers).query("sublayer == 'mlp' and layer == 0 and token == 'image'").iloc[0]
    assert layer0["agreement"] == 1.0 and layer0["agreement_random"] == 0.0
    assert layer0["composition"] == 1.0 and layer0["composition_random"] == 0.0
    cv = res.class_value.query("sublayer == 'mlp' and layer == 0")
    np.testing.assert_allclose(cv["max_cosine"], 1.0, rtol=1e-5)
    assert all(PLANTED * c <= j < PLANTED * (c + 1) for c, j in zip(cv["class"], cv["memory"]))
    # Usage: each planted memory is among the top 5 of every image token of its class.
    per_class = (res.images["label"].value_counts().sort_index() * 9).to_numpy()  # 9 image tokens
    np.testing.assert_array_equal(res.usage["mlp"][0, : PLANTED * N_CLASSES], np.repeat(per_class, PLANTED))


def test_planted_memories_wrong_targets_do_not_agree(tmp_path):
    """Labels shifted by one: the planted memories no longer match the target class."""
    model, data = planted_model(), planted_data()
    data.labels = (data.labels + 1) % N_CLASSES
    memories(model, data, str(tmp_path), sublayers=("mlp",), batch_size=10, progress=False)
    row = agreement_by_layer(load_memory_results(tmp_path).layers).query(
        "sublayer == 'mlp' and layer == 0 and token == 'image'").iloc[0]
    assert row["agreement"] == 0.0 and row["composition"] == 1.0  # composition ignores the label


def test_unlabeled_images_need_an_explicit_target(tmp_path):
    """No silent fallback: "label" refuses unlabeled images; "predicted" reads the top-1 class
    and a fixed class reads that class, each recorded in the settings."""
    model, data = planted_model(), planted_data()
    data.labels = np.full(len(data.labels), -1)
    with pytest.raises(ValueError, match="have no label"):
        memories(model, data, str(tmp_path / "label"), sublayers=("mlp",), batch_size=5, progress=False)
    memories(model, data, str(tmp_path / "pred"), sublayers=("mlp",), batch_size=5, progress=False,
             target="predicted")
    res = load_memory_results(tmp_path / "pred")
    assert res.settings["target"] == "predicted"
    np.testing.assert_array_equal(res.images["target"], res.images["pred"])
    memories(model, data, str(tmp_path / "fixed"), sublayers=("mlp",), batch_size=5, progress=False, target="3")
    res = load_memory_results(tmp_path / "fixed")
    assert res.settings["target"] == "3" and (res.images["target"] == 3).all()


# ------------------------------------------------------------------ streaming == direct
def reference_counts(model: HookedViT, x: torch.Tensor, labels: np.ndarray, k: int = 5) -> pd.DataFrame:
    """Per image, sublayer and layer, the counts of `memories`, computed directly from a
    cache of the whole set with numpy sorting and Python sets."""
    cfg = model.cfg
    _, cache = model.run_with_cache(x)
    rand = random_classes(range(len(x)), labels, cfg.n_classes).numpy()
    W_U = model.W_U.detach().numpy()
    rows = []
    for sublayer, key, out in (("attn", "attn.hook_z", "hook_attn_out"), ("mlp", "mlp.hook_pre", "hook_mlp_out")):
        for layer in range(cfg.n_layers):
            scores = memory_values(model, sublayer)[layer].detach().numpy() @ W_U  # [m, c]
            best = {c: set(np.argsort(-scores[:, c])[:k]) for c in range(cfg.n_classes)}
            mem_class = scores.argmax(1)
            coef = cache[f"blocks.{layer}.{key}"].flatten(2).numpy()
            top1 = model.to_class_logits(cache[f"blocks.{layer}.{out}"]).argmax(-1).numpy()
            for i in range(len(x)):
                flags = {m: [] for m in METRICS}
                for p in range(coef.shape[1]):
                    top = set(np.argsort(-coef[i, p])[:k])
                    flags["agree"].append(bool(top & best[labels[i]]))
                    flags["agree_random"].append(bool(top & best[rand[i]]))
                    flags["compose"].append(top1[i, p] in {mem_class[j] for j in top})
                    flags["compose_random"].append(rand[i] in {mem_class[j] for j in top})
                row = {"index": i, "sublayer": sublayer, "layer": layer}
                for m, f in flags.items():
                    row[f"cls_{m}"] = int(f[0]) if cfg.class_token else 0
                    row[f"image_{m}"] = int(sum(f[cfg.n_prefix_tokens:]))
                rows.append(row)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_base_patch16_reg4_gap_256"])
def test_streamed_counts_equal_direct_computation(name, tmp_path):
    timm_model, size = make_timm(name, seed=2)
    model = HookedViT.from_timm(timm_model)
    x = images(size, batch=5, seed=3)
    labels = np.array([3, 1, 4, 1, 5])
    data = ArrayDataset(x.numpy(), labels)
    store = memories(model, data, str(tmp_path), batch_size=2, progress=False)  # batches of 2, 2, 1
    res = load_memory_results(tmp_path)
    expected = reference_counts(model, x, labels)
    got = res.layers.sort_values(["index", "sublayer", "layer"]).reset_index(drop=True)
    expected = expected.sort_values(["index", "sublayer", "layer"]).reset_index(drop=True)
    for column in expected.columns[3:]:
        np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy(), err_msg=column)
    assert (got["image_tokens"] == model.cfg.grid_size[0] * model.cfg.grid_size[1]).all()
    # Usage totals over all batches == top-k counts over the whole set.
    _, cache = model.run_with_cache(x)
    for layer in range(model.cfg.n_layers):
        top = cache[f"blocks.{layer}.mlp.hook_pre"].topk(5, dim=-1).indices.flatten()
        np.testing.assert_array_equal(res.usage["mlp"][layer], np.bincount(top.numpy(), minlength=model.cfg.d_mlp))
    # A rerun with the same settings resumes with nothing left to do.
    assert memories(model, data, str(tmp_path), batch_size=2, progress=False).done == store.done


# ------------------------------------------------------------------ weights and statistics
def test_class_value_agreement_is_max_cosine():
    timm_model, _ = make_timm("vit_tiny_patch16_224", seed=4)
    model = HookedViT.from_timm(timm_model)
    table = class_value_agreement(model)
    assert len(table) == 2 * model.cfg.n_layers * 10
    v = model.W_out[1].detach().numpy()
    u = model.W_U[:, 7].detach().numpy()
    cos = v @ u / np.linalg.norm(v, axis=1) / np.linalg.norm(u)
    row = table.query("sublayer == 'mlp' and layer == 1 and `class` == 7").iloc[0]
    assert row["max_cosine"] == pytest.approx(cos.max(), rel=1e-5) and row["memory"] == cos.argmax()


def test_random_classes_differ_from_target_and_ignore_batching():
    targets = np.arange(200) % 7
    rand = random_classes(range(200), targets, 7, seed=3).numpy()
    assert (rand != targets).all() and set(rand) == set(range(7))
    again = np.concatenate([random_classes(range(a, a + 50), targets[a:a + 50], 7, seed=3).numpy()
                            for a in range(0, 200, 50)])
    np.testing.assert_array_equal(rand, again)
    assert not np.array_equal(rand, random_classes(range(200), targets, 7, seed=4).numpy())


def test_permutation_test_on_hand_made_inputs():
    exact = permutation_test([1, 2, 3], [4, 5, 6])  # 20 splits, 2 as extreme as observed
    assert exact["difference"] == -3.0 and exact["p_value"] == pytest.approx(0.1)
    same = permutation_test([1, 2, 3, 4], [1, 2, 3, 4])
    assert same["difference"] == 0.0 and same["p_value"] == 1.0
    far = permutation_test(np.arange(30) + 100.0, np.arange(30), n_resamples=500, seed=0)
    assert far["p_value"] < 0.01 and far["mean_a"] == pytest.approx(114.5)
    single = permutation_test([5], [1, 2, 3])  # 4 splits: differences 3, -7/3, -1, 1/3
    assert single["p_value"] == pytest.approx(0.25)
    assert np.isnan(permutation_test([1.0], [])["p_value"])


def test_correct_vs_wrong_compares_per_image_rates():
    images_df = pd.DataFrame({"index": [0, 1, 2, 3, 4], "correct": [True, True, True, False, False]})
    agree = [4, 3, 4, 1, 0]
    layers = pd.DataFrame({"index": range(5), "sublayer": "mlp", "layer": 0, "image_tokens": 4,
                           "image_agree": agree})
    row = correct_vs_wrong(images_df, layers, token="image", n_resamples=100).iloc[0]
    assert row["correct_mean"] == pytest.approx(11 / 12) and row["wrong_mean"] == pytest.approx(1 / 8)
    assert row["n_correct"] == 3 and row["n_wrong"] == 2
    ref = permutation_test([1, 0.75, 1], [0.25, 0], n_resamples=100)
    assert row["p_value"] == pytest.approx(ref["p_value"])


def cls_and_image_layers() -> tuple[pd.DataFrame, pd.DataFrame]:
    """5 images, 3 correct; one sublayer and layer; class token and 4 image tokens each."""
    images_df = pd.DataFrame({"index": [0, 1, 2, 3, 4], "correct": [True, True, True, False, False]})
    layers = pd.DataFrame({"index": range(5), "sublayer": "attn", "layer": 2, "cls_tokens": 1, "image_tokens": 4,
                           "cls_agree": [1, 1, 0, 0, 0], "image_agree": [4, 3, 4, 1, 0]})
    return images_df, layers


def test_correct_vs_wrong_defaults_to_the_class_token():
    """The paper's comparison: token 0 only. Correct 1, 1, 0 vs wrong 0, 0; of the 10 exact
    splits, |difference| >= 2/3 for the 3 with both ones in the first group and the 1 with
    none: p = 0.4."""
    images_df, layers = cls_and_image_layers()
    row = correct_vs_wrong(images_df, layers).iloc[0]
    assert (row["token"], row["sublayer"], row["layer"]) == ("cls", "attn", 2)
    assert row["correct_mean"] == pytest.approx(2 / 3) and row["wrong_mean"] == 0.0
    assert row["p_value"] == pytest.approx(0.4)


def test_correct_vs_wrong_by_token_reports_both():
    images_df, layers = cls_and_image_layers()
    table = correct_vs_wrong_by_token(images_df, layers, n_resamples=100)
    assert table["token"].tolist() == ["cls", "image"]
    assert table["correct_mean"].tolist() == pytest.approx([2 / 3, 11 / 12])
    assert table["wrong_mean"].tolist() == pytest.approx([0.0, 1 / 8])
    no_cls = layers.assign(cls_tokens=0, cls_agree=0)  # a model without a class token
    assert correct_vs_wrong_by_token(images_df, no_cls)["token"].tolist() == ["image"]
    with pytest.raises(ValueError, match="no cls tokens"):
        correct_vs_wrong(images_df, no_cls)
    with pytest.raises(ValueError, match="unknown token kind"):
        correct_vs_wrong(images_df, layers, token="register")


def class_value_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Block (attn, 0): trained above random for all 6 classes; block (mlp, 0): below for all,
    by less than any attn difference."""
    classes = np.arange(6)
    rows = lambda sublayer, cos: pd.DataFrame({"sublayer": sublayer, "layer": 0, "class": classes,
                                               "max_cosine": cos, "memory": 0})
    random = pd.concat([rows("attn", 0.3 + 0.0 * classes), rows("mlp", 0.3 + 0.0 * classes)], ignore_index=True)
    trained = pd.concat([rows("attn", 0.3 + 0.01 * (classes + 1)), rows("mlp", 0.3 - 0.001 * (classes + 1))],
                        ignore_index=True)
    return trained, random


def test_class_value_vs_random_per_block():
    """Exact one-sided signed-rank p: all 6 differences positive -> 1 / 2^6; all negative -> 1."""
    trained, random = class_value_tables()
    table = class_value_vs_random(trained, random.sample(frac=1.0, random_state=0))  # pairs by key, not order
    assert table[["sublayer", "layer", "n_classes"]].values.tolist() == [["attn", 0, 6], ["mlp", 0, 6]]
    assert table["p_value"].tolist() == pytest.approx([1 / 64, 1.0])
    assert table["pretrained_mean"].tolist() == pytest.approx([0.335, 0.2965])


def test_class_value_vs_random_pooled_summary():
    """12 pairs: the 6 mlp differences take ranks 1-6 (negative), attn ranks 7-12, W+ = 57;
    the exact p is the share of the 2^12 sign patterns with W+ >= 57."""
    trained, random = class_value_tables()
    pooled = class_value_vs_random_pooled(trained, random).iloc[0]
    sums = np.array([sum(r for r in range(1, 13) if mask >> (r - 1) & 1) for mask in range(2 ** 12)])
    assert pooled["n_pairs"] == 12 and pooled["statistic"] == 57
    assert pooled["p_value"] == pytest.approx((sums >= 57).mean())
    with pytest.raises(ValueError, match="do not pair up"):
        class_value_vs_random_pooled(trained, random.iloc[:-1])


def test_class_value_agreement_leaves_the_weights_alone():
    """The original normalises the weights in place; ours normalises copies."""
    model = HookedViT.from_timm(make_timm("vit_tiny_patch16_224", seed=6)[0])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    class_value_agreement(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, msg=name)


# ------------------------------------------------------------------ command line, report, demo
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("memories_cli")
    model = randomize_(timm.create_model("vit_tiny_patch16_224", depth=2, embed_dim=48, num_heads=4,
                                         num_classes=10, img_size=32, patch_size=8).eval(), std=0.2)
    save_file(model.state_dict(), root / "tiny.safetensors")
    return root


def test_command_line_and_report(tiny_checkpoint, capsys):
    from circuits.cli import main

    root = tiny_checkpoint
    model = ["--model", str(root / "tiny.safetensors"),
             "--arch", "vit_tiny_patch16_224:depth=2,embed_dim=48,num_heads=4,img_size=32,patch_size=8"]
    data = ["--data", "synthetic:test:12", "--batch-size", "6"]
    assert main(["memories", *model, *data, "--out", str(root / "mem")]) == 0, capsys.readouterr().err
    assert main(["probe", *model, *data, "--per-class", "2", "--out", str(root / "probe")]) == 0, \
        capsys.readouterr().err
    assert len(pd.read_parquet(root / "mem" / "layers")) == 12 * 2 * 2
    assert len(pd.read_parquet(root / "probe" / "tokens")) == 12 * 3 * 2
    assert main(["report", str(root / "mem"), str(root / "probe"), "--out", str(root / "report.html")]) == 0
    html = (root / "report.html").read_text()
    assert "Key-value memories" in html and "Linear probes vs projection" in html


def test_demo_step(tiny_checkpoint):
    from circuits.report.demo import DemoContext, memories_step
    from circuits.embedded import SyntheticShapes, normalize
    from circuits.report import build_report
    from circuits.runs.sources import load_model

    root = tiny_checkpoint
    arch = "vit_tiny_patch16_224:depth=2,embed_dim=48,num_heads=4,img_size=32,patch_size=8"
    ctx = DemoContext(out=root / "demo", trained=load_model(str(root / "tiny.safetensors"), arch),
                      random=load_model(str(root / "tiny.safetensors"), arch, random_weights=True),
                      data=SyntheticShapes(16, split="test", transform=normalize), batch_size=8)
    memories_step(ctx)
    runs = sorted(str(p.parent.relative_to(ctx.out)) for p in Path(ctx.out).rglob("manifest.json"))
    assert runs == ["memories/random weights", "memories/trained", "probes/trained"]
    html = build_report([ctx.out], root / "demo.html").read_text()
    assert "trained vs random weights" in html and "Composition by layer" in html
    # issue 17: the paper's per-block class-value tests and class-token comparison are shown
    assert "Class-value agreement per block" in html and "pooled over (sublayer, layer, class)" in html
    per_block = html.split("Class-value agreement per block")[1].split("</table>")[0]
    assert per_block.count("<tr>") == 1 + 2 * 2  # header + (attn, mlp) x 2 layers
    summary = json.loads((Path(ctx.out) / "memories" / "trained" / "summary.json").read_text())
    both = [r for r in summary["correct_vs_wrong"] if r["n_correct"] and r["n_wrong"] and r["token"] == "cls"]
    assert ("of the class token (the paper" in html) == bool(both)  # no caption without its data
