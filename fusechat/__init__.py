"""fusechat: fuse chat LLMs of different architectures and tokenizers, then merge them."""

__version__ = "0.1.0"
