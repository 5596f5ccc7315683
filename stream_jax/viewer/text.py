"""Token text for the viewer: one display string per token, so block j's text is exactly its tokens'.

The page shows the text of a block as the concatenation of the pieces of the tokens in it, so the mapping
block <-> token span <-> text is exact by construction. Pieces come from the text and the tokenizer's char
offsets (piece i runs from token i's first char to token i+1's, gaps included, so the pieces concatenate to
the text) or, without offsets, from the tokenizer's vocabulary strings.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def pieces_from_offsets(text: str, offsets, special: Optional[Sequence[str]] = None) -> list[str]:
  """One string per token from char offsets [T, 2]: text[start_i : start_next), where start_next is the
  next token with a non-empty span (the last runs to the end of its own span). Tokens with an empty span
  (BOS) get their special-token string, or ''."""
  off = np.asarray(offsets, np.int64).reshape(-1, 2)
  real = off[:, 1] > off[:, 0]
  out = [""] * len(off)
  nxt = None
  for i in range(len(off) - 1, -1, -1):
    if real[i]:
      end = off[i, 1] if nxt is None else max(nxt, off[i, 1])
      out[i] = text[off[i, 0]:end]
      nxt = off[i, 0]
    elif special is not None:
      out[i] = special[i]
  return out


def pieces_from_tokenizer(tokenizer, ids) -> list[str]:
  """One string per token from the vocabulary: SentencePiece's '▁' becomes a space and byte tokens
  (<0x0A>) their characters (consecutive bytes decoded together as UTF-8)."""
  toks = tokenizer.convert_ids_to_tokens([int(i) for i in np.asarray(ids).ravel()])
  out, pending = [], []  # pending: (index, byte) of a run of byte tokens
  def flush():
    if pending:
      text = bytes(b for _, b in pending).decode("utf-8", errors="replace")
      out[pending[0][0]] = text  # the run's text sits on its first token; the others stay empty
      pending.clear()
  for i, t in enumerate(toks):
    m = _BYTE.match(t or "")
    if m:
      out.append("")
      pending.append((i, int(m.group(1), 16)))
      continue
    flush()
    out.append((t or "").replace("\u2581", " "))
  flush()
  return out


def chunks(pieces: Sequence[str], size: int) -> list[list[str]]:
  return [list(pieces[i:i + size]) for i in range(0, len(pieces), size)]
