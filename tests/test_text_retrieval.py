"""Text retrieval through decomposition components: the scoring functions on planted data,
and the decompose run's text option on a random-weight open_clip tower (exact projection
maps, text directions from its own text tower)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from circuits.decomposition.scoring import text_components, text_retrieval
from helpers import images, randomize_, save_hf_clip_folder


def test_text_components_find_the_planted_component_and_rank_images():
    gen = torch.Generator().manual_seed(0)
    n, C, D = 64, 6, 16
    directions = F.normalize(torch.randn(2, D, generator=gen), dim=-1)
    mapped = 0.1 * torch.randn(n, C, D, generator=gen)
    strength = torch.randn(n, generator=gen)
    mapped[:, 3] += strength[:, None] * directions[0]  # component 3 carries text 0
    mapped[:, 1] += 2 * strength[:, None].flip(0) * directions[1]  # component 1 carries text 1
    feats = text_components(mapped, ["zero", "one"], 5 * directions, k=1)
    assert feats.components == [[3], [1]] and torch.allclose(feats.directions.norm(dim=-1), torch.ones(2))
    order, sim = text_retrieval(mapped, feats)
    assert order.shape == sim.shape == (2, n)
    assert order[0, 0] == strength.argmax() and order[1, 0] == strength.flip(0).argmax()
    torch.testing.assert_close(sim[0], mapped[:, 3] @ directions[0])
    assert text_components(mapped, ["zero", "one"], directions, k=2, exclude=[3]).components[0][0] != 3
    with pytest.raises(ValueError, match="one direction of width 16 per text"):
        text_components(mapped, ["zero"], directions)


class Tiles(torch.utils.data.Dataset):
    """Random 32 px images with a class and a binary "background" attribute."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def describe(self) -> str:
        return f"Tiles({self.n}, {self.seed})"

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = images(32, 1, seed=self.seed * 1000 + i)[0]
        return {"image": image, "label": i % 3, "background": (i // 3) % 2, "index": i}


@pytest.fixture(scope="module")
def clip_and_tower():
    open_clip = pytest.importorskip("open_clip")
    from hooked_vit import HookedViT
    from hooked_vit.text_classes import install_text_classes
    from test_loading_open_clip import make_clip

    clip = make_clip("ViT-B-32")
    tower = HookedViT.from_open_clip(clip)
    texts = ["a photo of a cat", "a photo of a dog", "a car"]
    tok = lambda t: open_clip.tokenize(t, context_length=16)
    from circuits.decomposition.align import clip_text_directions

    install_text_classes(tower, clip_text_directions(clip, tok, texts), class_names=texts)
    return clip, tower, texts, clip_text_directions(clip, tok, texts)


def test_decompose_run_ranks_images_by_text(clip_and_tower, tmp_path):
    from circuits.decomposition.decompose import decompose
    from circuits.runs.decompose import decompose_run

    _, model, texts, directions = clip_and_tower
    data, ref = Tiles(9, seed=1), Tiles(12, seed=2)
    decompose_run(model, data, ref, tmp_path / "run", texts=texts, text_directions=directions, text_k=3,
                  text_top=4, batch_size=4, n_heatmaps=0, progress=False, max_k=2)
    info = json.loads((tmp_path / "run" / "reference.json").read_text())
    table = pd.read_parquet(tmp_path / "run" / "images").sort_values("index")
    sim = np.stack(table["text_similarity"].to_numpy())
    assert sim.shape == (9, 3) and [t["text"] for t in info["texts"]] == texts
    x = torch.stack([data[i]["image"] for i in range(9)])
    dec = decompose(model, x)
    for j, row in enumerate(info["texts"]):  # independently: chosen terms through the projection
        assert len(row["components"]) == 3 and not any(dec.components[c].is_bias for c in row["components"])
        part = dec.terms[:, row["components"], 0].sum(1) @ model.image_proj.weight.detach().T
        np.testing.assert_allclose(sim[:, j], (part @ directions[j]).numpy(), rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    best = [im["index"] for im in summary["texts"][0]["images"]]
    assert best == list(np.argsort(-sim[:, 0], kind="stable")[:4])
    with pytest.raises(ValueError, match="text directions differ"):
        decompose_run(model, data, ref, tmp_path / "run", texts=texts, text_directions=directions.flip(0),
                      text_k=3, batch_size=4, n_heatmaps=0, progress=False, max_k=2)


def test_decompose_run_refuses_texts_it_cannot_use(clip_and_tower, tmp_path):
    from circuits.runs.decompose import decompose_run
    from helpers import make_timm
    from hooked_vit import HookedViT

    _, model, texts, directions = clip_and_tower
    data = Tiles(3, seed=1)
    with pytest.raises(ValueError, match="one row each"):
        decompose_run(model, data, data, tmp_path / "a", texts=texts[:2], text_directions=directions, progress=False)
    with pytest.raises(ValueError, match="width 5"):
        decompose_run(model, data, data, tmp_path / "b", texts=texts, text_directions=directions[:, :5], progress=False)
    plain = HookedViT.from_timm(make_timm("vit_tiny_patch16_224")[0])
    with pytest.raises(ValueError, match="no image projection"):
        decompose_run(plain, data, data, tmp_path / "c", texts=texts, text_directions=directions, progress=False)


def test_textspan_run_writes_each_heads_texts(clip_and_tower, tmp_path):
    from circuits.runs.textspan import textspan_run
    from circuits.text_span import head_contributions, text_span

    _, model, texts, directions = clip_and_tower
    data = Tiles(7, seed=3)
    textspan_run(model, data, tmp_path / "span", texts, directions, layers=[1], k=2, batch_size=3, progress=False)
    table = pd.read_parquet(tmp_path / "span" / "textspan.parquet")
    assert list(table.columns) == ["layer", "head", "rank", "text", "explained_variance"]
    assert len(table) == model.cfg.n_heads * 2 and set(table["layer"]) == {1}
    x = torch.stack([data[i]["image"] for i in range(7)])
    heads = head_contributions(model, x, [1])[0]  # all images at once, independently of the run's batches
    for head in range(model.cfg.n_heads):
        chosen, explained = text_span(heads[head], directions, k=2)
        rows = table[table["head"] == head].sort_values("rank")
        assert list(rows["text"]) == [texts[j] for j in chosen]
        np.testing.assert_allclose(rows["explained_variance"], explained, rtol=1e-3, atol=1e-6)
    summary = json.loads((tmp_path / "span" / "summary.json").read_text())
    assert summary["n_images"] == 7 and len(summary["heads"]) == model.cfg.n_heads
    with pytest.raises(ValueError, match=r"outside \[-2, 2\)"):
        textspan_run(model, data, tmp_path / "bad", texts, directions, layers=[5], progress=False)
    with pytest.raises(ValueError, match="width 24"):
        textspan_run(model, data, tmp_path / "bad", texts, directions[:, :4], progress=False)


# ----------------------------------------------------------------------------- command line
WORDS = ["a", "photo", "of", "cat", "dog", "red", "car"]


@pytest.fixture(scope="module")
def hf_clip_folder(tmp_path_factory):
    """A random-weight transformers CLIPModel saved with a tiny character-level CLIPTokenizer."""
    pytest.importorskip("transformers")
    return save_hf_clip_folder(tmp_path_factory.mktemp("hf_clip"))


def test_read_texts_and_refusals(tmp_path):
    from circuits.runs.specs import parse_model_spec
    from circuits.runs.texts import read_texts, text_encoder

    (tmp_path / "prompts.txt").write_text("# colours\na red car\n\na blue car\n")
    assert read_texts(" a dog, a cat ,", str(tmp_path / "prompts.txt")) == ["a dog", "a cat", "a red car", "a blue car"]
    with pytest.raises(ValueError, match="repeated"):
        read_texts("a dog,a dog", None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_texts(None, str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="text tower"):
        text_encoder(parse_model_spec("embedded"))
    with pytest.raises(ValueError, match="unrelated random initialisations"):
        text_encoder(parse_model_spec("open_clip:ViT-B-32"))


def test_decompose_and_textspan_commands_with_texts(hf_clip_folder, tmp_path, capsys):
    from circuits.cli import main
    from circuits.runs.specs import parse_model_spec
    from circuits.runs.texts import text_directions

    model_arg = f"hf:{hf_clip_folder}"
    texts = ["a photo of a cat", "a red car", "a dog"]
    common = ["--model", model_arg, "--data", "synthetic:test:6", "--device", "cpu", "--batch-size", "3"]
    code = main(["decompose", *common, "--reference", "synthetic:val:8", "--reference-limit", "8", "--max-k", "2",
                 "--heatmaps", "0", "--texts", ",".join(texts), "--text-k", "2", "--out", str(tmp_path / "dec")])
    assert code == 0, capsys.readouterr().err
    assert "'a red car': components" in capsys.readouterr().out
    info = json.loads((tmp_path / "dec" / "reference.json").read_text())
    stored = np.load(tmp_path / "dec" / "reference.npz")["text_directions"]
    np.testing.assert_allclose(stored, text_directions(parse_model_spec(model_arg), texts)[1].numpy(), rtol=1e-5, atol=1e-6)
    assert [t["text"] for t in info["texts"]] == texts and all(len(t["components"]) == 2 for t in info["texts"])
    (tmp_path / "pool.txt").write_text("\n".join(texts))
    code = main(["textspan", *common, "--text-file", str(tmp_path / "pool.txt"), "--layers", "0,1", "--k", "2",
                 "--out", str(tmp_path / "span")])
    assert code == 0, capsys.readouterr().err
    table = pd.read_parquet(tmp_path / "span" / "textspan.parquet")
    assert len(table) == 2 * 4 * 2 and set(table["text"]) <= set(texts)
    assert main(["textspan", *common, "--out", str(tmp_path / "none")]) == 2
    assert "needs prompts" in capsys.readouterr().err



def test_text_commands_load_the_clip_model_once(hf_clip_folder, tmp_path, monkeypatch):
    """Both towers come from one load of the checkpoint (it used to be read twice)."""
    import transformers

    from circuits.cli import main

    loads = []
    real = transformers.PreTrainedModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(cls.__name__)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(counting))
    assert main(["textspan", "--model", f"hf:{hf_clip_folder}", "--data", "synthetic:test:3", "--device", "cpu",
                 "--texts", "a cat,a dog", "--layers", "1", "--k", "1", "--out", str(tmp_path / "span")]) == 0
    assert loads == ["CLIPModel"]


def test_report_draws_the_textspan_run(clip_and_tower, tmp_path):
    """The report's TextSpan section: the layer x head heatmap holds each head's total explained
    variance and the table lists its texts in rank order."""
    from circuits.report import build_report
    from circuits.report.textspan import _heatmap, _rows
    from circuits.runs.textspan import textspan_run

    _, model, texts, directions = clip_and_tower
    textspan_run(model, Tiles(5, seed=2), tmp_path / "span", texts, directions, layers=[0, 1], k=2, batch_size=5,
                 progress=False)
    table = pd.read_parquet(tmp_path / "span" / "textspan.parquet")
    fig = _heatmap("span", table, 5)
    totals = table.groupby(["layer", "head"])["explained_variance"].sum().unstack("head").to_numpy()
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), totals, atol=1e-3)
    rows = _rows(table)
    assert len(rows) == 2 * model.cfg.n_heads
    first = table[(table["layer"] == 0) & (table["head"] == 0)].sort_values("rank")
    assert rows[0]["texts"].startswith(first["text"].iloc[0])
    page = build_report([tmp_path], tmp_path / "report.html").read_text()
    assert "TextSpan: the texts each head" in page and "No renderer" not in page
