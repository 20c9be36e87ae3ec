"""`python -m minirlhf label`: human preferences in the browser.

A local web page where a person ranks K responses per prompt (written as the preference
JSONL the reward model trains on), a blind side-by-side comparison of two checkpoints
(win rate with a confidence interval), and inter-annotator agreement.

    cli.py       options and the command
    server.py    stdlib ThreadingHTTPServer: static page + JSON API, access checks
    state.py     prompts handed to sessions, judgements validated into rows, undo, progress
    store.py     the labels file: fsync per row, restart, atomic undo
    stats.py     win rate + Wilson interval, pairwise agreement, Kendall's tau-b
    sampling.py  the one seam to the rest of minirlhf (checkpoints, sampling, formats)
    static/      index.html, label.js, label.css (package data; no CDN, no build step)
"""
