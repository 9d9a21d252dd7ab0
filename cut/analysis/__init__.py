"""Looking at what CUT sees: token-level views of judged records under a model.

    python -m cut.analysis.inspect    what a judgment flags: p(y|x,j) / p(y|x) per response token

`page` is the self-contained HTML shell (paged, filtered, sorted token cards) the views share.
"""
