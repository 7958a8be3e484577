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
from helpers import images


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
