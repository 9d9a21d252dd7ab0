"""Contrastive Unlikelihood Training (Xu et al., arXiv 2312.14591) for Hugging Face causal LMs."""

__version__ = "0.1.0"
