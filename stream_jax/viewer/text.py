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


# The search index: per text chunk a bit set of the trigrams of its lowercased text (UTF-16 code units, as the
# page sees strings; the chunk's text plus the next chunk's first two units, so a match across the boundary
# is found from the chunk it starts in). The page fetches only the chunks whose bits hold every trigram of
# the query (in this chunk or the next): a search before the text has loaded reads one or two chunks, not
# the document. One hash per trigram, bits per chunk ~8x its distinct trigrams (few false candidates).
_K = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x2C1B3C6D)


def trigram_hashes(units: np.ndarray) -> np.ndarray:
  """uint32 hash of every trigram of uint16 code units (the page computes the same with Math.imul)."""
  u = units.astype(np.uint32)
  if len(u) < 3:
    return np.zeros(0, np.uint32)
  with np.errstate(over="ignore"):
    h = (u[:-2] * np.uint32(_K[0])) ^ (u[1:-1] * np.uint32(_K[1])) ^ (u[2:] * np.uint32(_K[2]))
    h ^= h >> np.uint32(15)
    h = h * np.uint32(_K[3])
    h ^= h >> np.uint32(13)
  return h


def search_index(chunk_pieces: Sequence[Sequence[str]]) -> bytes:
  """int32[4] header (chunks, bits per chunk m, 0, 0), then uint32[chunks, m / 32] bit sets."""
  units = [np.frombuffer("".join(p.lower() for p in c).encode("utf-16-le", "surrogatepass"), "<u2")
           for c in chunk_pieces]
  hashes = [trigram_hashes(np.concatenate([u, units[i + 1][:2]]) if i + 1 < len(units) else u)
            for i, u in enumerate(units)]
  distinct = max([len(np.unique(h)) for h in hashes] + [1])
  m = int(min(1 << 22, max(256, 1 << int(np.ceil(np.log2(8 * distinct))))))
  words = np.zeros((len(units), m // 32), np.uint32)
  for i, h in enumerate(hashes):
    bits = np.unique(h & np.uint32(m - 1))
    np.bitwise_or.at(words[i], bits >> 5, np.left_shift(np.uint32(1), (bits & 31).astype(np.uint32)))
  return np.asarray([len(units), m, 0, 0], np.int32).tobytes() + words.tobytes()
