"""Named hooks: your pure functions, run inside the traced forward at named points of each layer.

    from stream_jax import hooks
    def scale_head(x, layer, args):                 # x: per-head attention output [B, T, N, H]
      return x * args["gain"][None, None, :, None]
    def last_token(x, layer, args):                  # read only, with an extra output
      return hooks.emit(x, x[:, -1])
    run = forward(model, params, ids, attention=StreamConfig(),
                  hooks=(hooks.Hook("attention_out", scale_head, layers=(5,)),
                         hooks.Hook("residual", last_token, name="last")),
                  hook_args={"gain": gain})
    run.hooked["last"][5]                            # [B, D]: layer 5's residual at the last token

Points, per layer, in the order they run (penzai names its sub-layers, gemma exposes attention through a
named identity hook; these are ours):
  "q", "k", "v"      after QK-norm and RoPE: q [B, T, N, H], k, v [B, T, K, H];
  "visible"          bool [B, N, T]: the keys each head may see at all (all True, or an intervention's
                     suppression); what is returned is the layer's suppression (Thought Anchors' attention
                     suppression: hidden keys get zero probability, the rest renormalise);
  "kept"             a Stream layer's kept set before attention, a BlockMask [B, N, nQ, C] (estimated, or
                     an intervention's forced mask; not on local layers kept exact as their window's band,
                     nor on select="ideal" layers, whose set the dense pass decides): the returned mask is
                     the one attended through (a forced mask of the same shape);
  "trace"            the layer's LayerTrace (kept set, mass, coverage): the returned one is recorded;
  "attention_out"    per-head attention output [B, T, N, H], before the output projection;
  "residual"         the residual stream after the layer [B, T, D].
A hook returns the value (the same shape and dtype: it replaces it) or `emit(value, extra)`: the extra (any
pytree of arrays) is collected in `TracedRun.hooked[hook.name][layer]`.

The functions are static (part of the jit cache key: pass the same function objects to reuse the
compiled forward); `hook_args` is a pytree argument of the compiled function, so new values of the same
shapes reuse it (a sweep over heads or gains compiles once), and a vmap over hook_args batches a sweep.
Nothing here is T x T: a hook sees what the layer holds. Interventions (stream_jax.intervene) are hooks of
these points: suppression and dropped blocks are what a "visible" hook returns (`suppress_keys`), a forced
mask what a "kept" hook returns (`force_kept`); their arrays are hook_args.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax

from stream_jax.mask import BlockMask

POINTS = ("q", "k", "v", "visible", "kept", "trace", "attention_out", "residual")


@dataclasses.dataclass(frozen=True)
class Hook:
  """`fn(value, layer: int, args) -> value | emit(value, extra)` at `point` of `layers` (None: every layer
  that has the point). `name` keys its extras in TracedRun.hooked (default: the point)."""

  point: str
  fn: Callable[[Any, int, Any], Any]
  layers: Optional[tuple[int, ...]] = None
  name: Optional[str] = None

  def __post_init__(self):
    if self.point not in POINTS:
      raise ValueError(f"Hook.point must be one of {POINTS}, got {self.point!r}")
    if not callable(self.fn):
      raise TypeError(f"Hook.fn must be callable fn(value, layer, args), got {type(self.fn).__name__}")
    if self.layers is not None:
      layers = tuple(self.layers) if not isinstance(self.layers, int) else (self.layers,)
      if any(isinstance(l, bool) or not isinstance(l, int) for l in layers):
        raise ValueError(f"Hook.layers must be None or layer ids (int), got {self.layers!r}")
      object.__setattr__(self, "layers", layers)
    if self.name is None:
      object.__setattr__(self, "name", self.point)

  def at(self, layer: int) -> bool:
    return self.layers is None or layer in self.layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Emitted:
  """A hook's value with an extra output (see `emit`)."""

  value: Any
  extra: Any


def emit(value, extra) -> Emitted:
  """Return this from a hook to keep `value` and collect `extra` in TracedRun.hooked[name][layer]."""
  return Emitted(value, extra)


def check_hooks(hooks: Sequence[Hook], num_layers: int) -> tuple[Hook, ...]:
  """Hooks as a tuple (a static argument), validated against the model: layer ids in range, one name per
  hook point (two hooks may share a name only if they never fire at the same layer)."""
  if isinstance(hooks, Hook):
    hooks = (hooks,)
  hooks = tuple(hooks or ())
  for h in hooks:
    if not isinstance(h, Hook):
      raise TypeError(f"hooks must be stream_jax.hooks.Hook objects, got {type(h).__name__}")
    bad = [l for l in (h.layers or ()) if not 0 <= l < num_layers]
    if bad:
      raise ValueError(f"Hook({h.point!r}, name={h.name!r}).layers {bad} out of range: layers are 0.."
                       f"{num_layers - 1}")
  for i, a in enumerate(hooks):
    for b in hooks[i + 1:]:
      if a.name == b.name and any(a.at(l) and b.at(l) for l in range(num_layers)):
        raise ValueError(f"two hooks named {a.name!r} fire at the same layer: give them different names "
                         "(Hook(..., name=...)) so their extras do not overwrite each other")
  return hooks


def apply(hooks: Sequence[Hook], point: str, value, layer: int, args, extras: dict):
  """Runs the hooks of `point` at `layer` in order on `value`; collects extras into `extras[name][layer]`."""
  for h in hooks:
    if h.point != point or not h.at(layer):
      continue
    out = h.fn(value, layer, args)
    if isinstance(out, Emitted):
      extras.setdefault(h.name, {})[layer] = out.extra
      out = out.value
    _check_same(h, layer, value, out)
    value = out
  return value


@dataclasses.dataclass(frozen=True)
class LayerHooks:
  """The hooks that fire at one layer, bound to their args and the extras collector: what a layer calls
  as `hook(point, value)`."""

  hooks: tuple[Hook, ...]
  layer: int
  args: Any
  extras: dict

  def __call__(self, point: str, value):
    return apply(self.hooks, point, value, self.layer, self.args, self.extras)

  def has(self, point: str) -> bool:
    return any(h.point == point and h.at(self.layer) for h in self.hooks)


def suppress_keys(layers: Sequence[int], name: str = "suppressed") -> Hook:
  """A "visible" hook that hides `args[name]`, bool [B|1, N|1, T] keys, from every head of `layers`:
  `intervene.suppress_spans` / `drop_blocks` as a hook (new key sets reuse the compiled forward)."""
  return Hook("visible", lambda vis, layer, args: vis & ~args[name], layers=tuple(layers), name=name)


def force_kept(layers: Sequence[int], name: str = "forced") -> Hook:
  """A "kept" hook that attends through `args[name][layer]` (a BlockMask of the layer's kept-set shape):
  `intervene.force_masks` as a hook, its masks as hook_args (new masks reuse the compiled forward)."""
  return Hook("kept", lambda mask, layer, args: args[name][layer], layers=tuple(layers), name=name)


def _check_same(hook: Hook, layer: int, before, after) -> None:
  """A replacement keeps the structure, shapes and dtypes of what it replaces (else a clear error here,
  not a shape error deep in the layer)."""
  where = f"Hook({hook.point!r}, name={hook.name!r}) at layer {layer}"
  if isinstance(before, BlockMask):
    if not isinstance(after, BlockMask):
      raise TypeError(f"{where} must return a BlockMask (or emit(mask, extra)), got {type(after).__name__}")
    layout = lambda m: (m.block_q, m.block_k, m.q_len, m.k_len, tuple(m.indices.shape[:-1]))  # noqa: E731
    if layout(before) != layout(after):
      raise ValueError(f"{where} must return a mask of the layer's layout (block_q, block_k, q_len, k_len, "
                       f"[B, N, nQ]) = {layout(before)}, got {layout(after)}")
    return
  a, b = jax.tree_util.tree_structure(before), jax.tree_util.tree_structure(after)
  if a != b:
    raise TypeError(f"{where} must return what it was given (structure {a}), got structure {b}")
  for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
    shape = lambda v: (getattr(v, "shape", None), getattr(v, "dtype", None))  # noqa: E731
    if shape(x) != shape(y):
      raise ValueError(f"{where} must keep shapes and dtypes: got {shape(y)} for {shape(x)}")
