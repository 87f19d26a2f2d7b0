"""One very long document (a single line of tens of MB): the job reads only what it packs, in
memory that does not grow with the line's length. Measured as peak RSS in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from datasets_app.formats import _json_line

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, resource, sys
from datasets_app.formats import texts_stream
from mistudio.testing.text_tokenizers import text_tokenizer
from models_app.ml.tokens import pack_documents

tok = text_tokenizer(sys.argv[2])
list(pack_documents(tok, ["warm the tokenizer up " * 5000], 64, 50))  # allocator warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seqs = list(pack_documents(tok, texts_stream(sys.argv[1]), 64, 50))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": len(seqs), "grew_kib": after - before}))
"""
LINE_MB = 40
BOUND_MB = 48  # reading the line whole would take more than its length (bytes, then str)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_line_of_tens_of_mb_is_read_in_bounded_memory(tmp_path, family):
    path = tmp_path / "texts.jsonl"
    sentence = "The quick brown fox jumps over the lazy dog, and <s> the cat sleeps. "
    with open(path, "wb") as fh:
        fh.write(_json_line("short first document"))
        fh.write(_json_line(sentence * (LINE_MB * 1024 * 1024 // len(sentence))))
        fh.write(_json_line("a document after it"))
    assert path.stat().st_size > LINE_MB * 1024 * 1024
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), family],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["n"] == 50
    assert result["grew_kib"] < BOUND_MB * 1024, result
