"""CLIP text class embeddings as the unembedding: zero-shot logits and identifiability
on random-weight CLIP models built locally (open_clip and transformers)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from helpers import images, randomize_, rel_err
from hooked_vit import HookedViT
from hooked_vit.text_classes import install_text_classes, text_class_embeddings

CLASSES = ["cat", "dog", "car", "tree", "boat"]
TEMPLATES = ("a photo of a {}.", "a drawing of a {}.")


@pytest.fixture(scope="module")
def open_clip_model():
    pytest.importorskip("open_clip", reason="open_clip extra not installed: pip install 'hooked-vit[open_clip]'")
    from test_loading_open_clip import make_clip

    return make_clip("ViT-B-32")


def test_open_clip_embeddings_are_normalised_template_means(open_clip_model):
    import open_clip

    emb = text_class_embeddings(open_clip_model, CLASSES, TEMPLATES)
    assert emb.shape == (5, 24) and torch.allclose(emb.norm(dim=-1), torch.ones(5))
    with torch.no_grad():  # independent reference: the zero-shot recipe, class by class
        for i, name in enumerate(CLASSES):
            tokens = open_clip.tokenize([t.format(name) for t in TEMPLATES], context_length=16)
            ref = F.normalize(F.normalize(open_clip_model.encode_text(tokens), dim=-1).mean(0), dim=0)
            assert rel_err(emb[i], ref) < 1e-5


def test_installed_text_head_gives_zero_shot_logits(open_clip_model):
    emb = text_class_embeddings(open_clip_model, CLASSES, TEMPLATES)
    model = install_text_classes(HookedViT.from_open_clip(open_clip_model), emb, scale=10.0)
    x = images(32)
    with torch.no_grad():
        ref = 10.0 * open_clip_model.encode_image(x) @ emb.T
        logits = model(x)
    assert model.cfg.n_classes == 5 and model.W_U.shape == (48, 5)
    assert rel_err(logits, ref) < 1e-5
    assert (logits.argmax(-1) == (open_clip_model.encode_image(x, normalize=True) @ emb.T).argmax(-1)).all()


def test_zero_shot_identifiability_end_to_end(open_clip_model, tmp_path):
    from circuits.identifiability import summarize
    from circuits.runs.identify import identify, load_results
    from test_identify import Shapes

    model = install_text_classes(HookedViT.from_open_clip(open_clip_model),
                                 text_class_embeddings(open_clip_model, CLASSES, TEMPLATES))
    class FiveShapes(Shapes):  # labels among the five text classes
        def __getitem__(self, i):
            return {**super().__getitem__(i), "label": i % 5}

    data = FiveShapes(6, size=32)
    identify(model, data, tmp_path / "run", batch_size=3, progress=False)
    res = load_results(tmp_path / "run")
    x = torch.stack([data[i]["image"] for i in range(6)])
    with torch.no_grad():
        logits = model(x)
    assert (res.images["pred"].to_numpy() == logits.argmax(-1).numpy()).all()
    target = torch.tensor(res.images["label"].to_numpy())
    assert (res.rank[:, 0, -1, 0] == (logits > logits.gather(1, target[:, None])).sum(1).numpy()).all()
    assert 0 <= summarize(res)["identifiable_token_rate"] <= 1


def test_install_refuses_a_head_that_is_not_a_projection(open_clip_model):
    model = HookedViT.from_open_clip(open_clip_model)
    with pytest.raises(ValueError, match="text width 7"):
        install_text_classes(model, torch.randn(3, 7))
    with pytest.raises(ValueError, match=r"\[n_classes, d_embed\]"):
        install_text_classes(model, torch.randn(24))
    with pytest.raises(ValueError, match="template must contain"):
        text_class_embeddings(open_clip_model, CLASSES, ("no slot",))


class WordTokenizer:
    """A tiny stand-in for CLIPTokenizer (which cannot be downloaded here): one id per word,
    start token 0, end token 2 (transformers' legacy CLIP eos id: pooling reads argmax id)."""

    def __init__(self, vocab: list[str]):
        self.ids = {w: i + 3 for i, w in enumerate(vocab)}

    def __call__(self, texts):
        rows = [[0] + [self.ids[w] for w in t.rstrip(".").split()] + [2] for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([r + [1] * (n - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": (torch.arange(n)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()}


def test_transformers_clip_text_classes(tmp_path):
    T = pytest.importorskip("transformers")
    vocab = sorted({w for t in TEMPLATES for w in t.rstrip(".").split() if w != "{}"} | set(CLASSES))
    config = T.CLIPConfig(
        text_config=dict(vocab_size=len(vocab) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=2),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    clip = randomize_(T.CLIPModel(config).eval(), std=0.2)
    tok = WordTokenizer(vocab)
    emb = text_class_embeddings(clip, CLASSES, TEMPLATES, tokenizer=tok)
    clip.save_pretrained(tmp_path)
    for source in (clip, str(tmp_path)):
        model = install_text_classes(HookedViT.from_hf(source), emb)
        x = images(32)
        with torch.no_grad():
            image = clip.get_image_features(pixel_values=x)
            image = image if torch.is_tensor(image) else image.pooler_output
            assert rel_err(model(x), image @ emb.T) < 1e-5
    with pytest.raises(ValueError, match="needs tokenizer="):
        text_class_embeddings(clip, CLASSES)


@torch.no_grad()
def test_head_contributions_sum_to_the_image_embedding(open_clip_model):
    from circuits.text_span import direct_contributions, head_contributions

    model = HookedViT.from_open_clip(open_clip_model)
    model.set_use_attn_result(True)
    x = images(32)
    out, cache = model.run_with_cache(x)
    last = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, 0]
    parts = cache.decompose_resid(incl_embeds=False, pos_slice=0)  # attn and MLP outputs
    parts = torch.cat([parts, cache["blocks.0.hook_resid_pre"][None, :, 0]])
    total = direct_contributions(model, parts, last).sum(0) + model.ln_final.bias @ model.image_proj.weight.T
    assert rel_err(total, out) < 1e-5
    # With text classes the contributions stay in the image-embedding space.
    texts = install_text_classes(HookedViT.from_open_clip(open_clip_model), torch.randn(3, 24))
    assert rel_err(direct_contributions(texts, parts, last), direct_contributions(model, parts, last)) < 1e-6
    heads = head_contributions(model, x, layers=[1])  # [1, h, b, d_embed]
    torch.testing.assert_close(heads[0].sum(0), direct_contributions(model, cache["blocks.1.hook_attn_out"][:, 0]
                                                                      - model.blocks[1].attn.b_O, last),
                               rtol=1e-5, atol=1e-5)


def test_text_span_finds_the_planted_texts():
    from circuits.text_span import text_span

    gen = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(20, 16, generator=gen), dim=-1)
    coef = torch.randn(200, 2, generator=gen) * torch.tensor([3.0, 1.5])
    outputs = coef @ texts[[7, 12]] + 0.01 * torch.randn(200, 16, generator=gen)
    chosen, explained = text_span(outputs, texts, k=3)
    assert chosen[:2] == [7, 12] and sum(explained[:2]) > 0.99 and explained[2] < 0.01
    with pytest.raises(ValueError, match="one width"):
        text_span(outputs, texts[:, :8])


def test_clip_text_directions_reuse_the_text_tower(open_clip_model):
    import open_clip
    from circuits.decomposition.align import clip_text_directions

    tok = lambda t: open_clip.tokenize(t, context_length=16)
    dirs = clip_text_directions(open_clip_model, tok, ["a cat", "a dog"])
    with torch.no_grad():
        ref = F.normalize(open_clip_model.encode_text(tok(["a cat", "a dog"])), dim=-1)
    assert rel_err(dirs, ref) < 1e-5
