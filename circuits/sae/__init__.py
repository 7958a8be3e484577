"""Sparse dictionaries (SAEs and transcoders) on ViT activations: store, train, save/load,
splice, evaluate and study features. See docs/sparse_autoencoders.md."""

from circuits.sae.dictionaries import ARCHITECTURES, DictionaryConfig, SparseDictionary

__all__ = ["ARCHITECTURES", "DictionaryConfig", "SparseDictionary"]
