"""fusechat: fuse chat LLMs of different architectures and tokenizers, then merge them."""

import os as _os

__version__ = "0.1.0"

# The repository keeps merge/ and eval/ beside fusechat/; an install maps them into this
# namespace (fusechat.merge, fusechat.eval: pyproject's package-dir), so site-packages gets no
# top-level `merge` or `eval`. From a checkout the same names resolve to the folders beside
# this one.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "merge")) and _os.path.isfile(
    _os.path.join(_root, "merge", "__init__.py")
):
    __path__.append(_root)
