"""Prompt packing: the trunk runs over the prompts' real tokens, not their left padding.

A batch of B prompts left-padded to P tokens holds sum(lengths) real tokens in B x P slots; at
TL;DR lengths (128..512 real tokens of 512) a third of every prompt pass is padding. Every
forward here runs each prompt once (`rollout.prompt_once_hidden`, `sampler.prefill`), so the
prompt pass is where the padding costs: `pack_prompts` lays the prompts back to back in R <= B
rows of P slots (first-fit decreasing, on the host), the trunk runs on [R, P] with each token
attending only to earlier tokens of its own prompt, and `prompt_forward` gathers every layer's
keys and values back into the left-padded [B, K, P, E] layout the responses attend to. What
follows (decoding, the response tokens' forward, losses) is unchanged, and the results equal
the padded computation's up to float rounding (tests/test_packing.py).

Responses (`rl.pack_responses`): scoring and the update run every [P | N] row's response too,
and there the padding is the responses' (a 20-token answer beside a 500-token one: most of an
iteration's slots at reasoning lengths). `pack_sequences` lays each prompt and its responses out
as a tree in rows of W = P + N slots: the prompt's real tokens once, then its responses' real
tokens back to back, each response seeing the prompt and its own earlier tokens only
(`sequence_hidden`); a prompt whose responses do not fit one row repeats in the next. The trunk
runs on [R', W] rows, no cache, and the hiddens are gathered back to the [B, K, N + 1]
layout `rollout.prompt_once_hidden` gives, so the heads and losses are unchanged.

Shapes: B prompts, P prompt slots, R packed rows, K kv heads, E head dim, D d_model; for
sequences B x K' responses (K' per prompt), N response slots, L = P + N, W row slots.
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from p3o_jax import model as M


@flax.struct.dataclass
class Packing:
    """B left-padded prompts laid back to back in R rows (leaves may carry a leading
    minibatch axis, `stack`)."""
    tokens: jax.Array       # int32 [R, P]  the prompts' real tokens, each prompt contiguous
    positions: jax.Array    # int32 [R, P]  each token's position within its prompt
    segments: jax.Array     # int32 [R, P]  1 + the prompt's index in the batch; 0: empty slot
    source: jax.Array       # int32 [B, P]  slot s of prompt b's left-padded row comes from
                            #               packed slot source[b, s] of the [R * P] flattening
                            #               (pad slots point at the prompt's first token)


def rows_needed(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """First-fit decreasing: (row [B], offset [B], rows used) placing sequences of `lengths`
    into rows of `width` slots."""
    fill: list[int] = []
    row, offset = np.zeros(len(lengths), np.int32), np.zeros(len(lengths), np.int32)
    for b in np.argsort(-lengths, kind="stable"):
        r = next((r for r, used in enumerate(fill) if used + lengths[b] <= width), len(fill))
        if r == len(fill):
            fill.append(0)
        row[b], offset[b] = r, fill[r]
        fill[r] += int(lengths[b])
    return row, offset, len(fill)


def pack_prompts(ids: np.ndarray, mask: np.ndarray, multiple: int = 1,
                 rows: int | None = None) -> Packing:
    """Host-side packing of left-padded prompts ids, mask [B, P] (numpy) into
    R = `rows` (default: the rows first-fit decreasing needs, rounded up to `multiple`) rows."""
    ids, mask = np.asarray(ids), np.asarray(mask).astype(bool)
    B, P = mask.shape
    lengths = mask.sum(-1)
    row, offset, used = rows_needed(lengths, P)
    R = rows if rows is not None else -(-used // multiple) * multiple
    if R < used:
        raise ValueError(f"pack_prompts: {B} prompts need {used} rows of {P}, got rows={R}")
    tokens, positions, segments = (np.zeros((R, P), np.int32) for _ in range(3))
    source = np.zeros((B, P), np.int32)
    for b in range(B):
        real = np.flatnonzero(mask[b])
        n, r, c = len(real), row[b], offset[b]
        tokens[r, c:c + n] = ids[b, real]
        positions[r, c:c + n] = np.arange(n)
        segments[r, c:c + n] = b + 1
        source[b] = r * P + c
        source[b, real] = r * P + c + np.arange(n)
    return Packing(tokens, positions, segments, source)


def pack_minibatches(ids: np.ndarray, mask: np.ndarray, index: np.ndarray,
                     multiple: int = 1) -> Packing:
    """Each minibatch's prompts (ids, mask [B, P]; index [S, b] rows of each) packed into the
    same number of rows (the most any needs, rounded up to `multiple`): leaves [S, ...]."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    width = mask.shape[-1]
    used = max(rows_needed(mask[i].astype(bool).sum(-1), width)[2] for i in index)
    rows = -(-used // multiple) * multiple
    packs = [pack_prompts(ids[i], mask[i], rows=rows) for i in index]
    return jax.tree.map(lambda *x: np.stack(x), *packs)


def packed_rows(num_prompts: int, batch_ways: int, steps: int = 8) -> int:
    """The multiple R is rounded up to: divisible over the batch's devices, and coarse enough
    that a run compiles at most ~`steps` shapes (R in steps of B / `steps`; B: the rows
    unpacked)."""
    step = max(-(-num_prompts // steps), 1)
    return step * batch_ways // np.gcd(step, batch_ways)


def prompt_forward(params, cfg: M.ModelConfig, prompts, prompt_mask, packing: Packing | None = None):
    """Each left-padded prompt [B, P] through the trunk once: (hidden of its last slot
    [B, D], per layer {"k", "v": [B, K, P, E]} in the left-padded layout). With `packing`
    the trunk runs on its [R, P] rows instead; the pads' keys and values are then copies of
    real ones, which no query sees (the prompt mask hides them)."""
    B, P = prompts.shape
    if packing is None:
        hidden, cache = M.forward(params, cfg, prompts, prompt_mask, M.init_cache(cfg, B, P), 0,
                                  positions=M.positions_from_mask(prompt_mask))
        return hidden[:, -1], cache
    R = packing.tokens.shape[0]
    seg = packing.segments
    sees = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)        # [R, P, P]
    hidden, cache = M.forward(params, cfg, packing.tokens, sees, M.init_cache(cfg, R, P), 0,
                              positions=packing.positions)
    row, col = packing.source // P, packing.source % P                          # [B, P]
    unpack = lambda c: c[row, :, col].transpose(0, 2, 1, 3)          # [B, P, K, E] -> [B, K, P, E]
    return hidden[row[:, -1], col[:, -1]], jax.tree.map(unpack, cache)


@flax.struct.dataclass
class SequencePacking:
    """B prompts and their K' responses each ([B, K', L] rows of [P | N] slots) laid out as
    trees in R rows of W slots (leaves may carry a leading minibatch axis, `stack`)."""
    take: jax.Array         # int32 [R, W]  slot of the flattened [B * K' * L] tokens that each
                            #               packed slot holds (0 on empty slots)
    positions: jax.Array    # int32 [R, W]  each token's position within its sequence
    groups: jax.Array       # int32 [R, W]  1 + the index of the (prompt, responses) tree; 0: empty
    parts: jax.Array        # int32 [R, W]  0: the tree's prompt; 1 + k: its response k
    source: jax.Array       # int32 [B, K', N + 1]  the packed slot (of the [R * W] flattening)
                            #               whose hidden is index j of `prompt_once_hidden`'s
                            #               layout: j = 0 the prompt's last token, j = i + 1
                            #               response token i (pads: the prompt's last token)
    heads: jax.Array        # int32 [R, Hc]  per row, the slots whose hidden predicts a response
                            #               token (the LM head runs on these only; 0: none)
    head_tokens: jax.Array  # int32 [R, Hc]  the token each predicts, a slot of the flattened
                            #               [B * K' * L] tokens
    head_of: jax.Array      # int32 [B, K', N]  where response token i's prediction is, in the
                            #               [R * Hc] flattening (pads: 0)


def tree_layout(prompt_mask: np.ndarray, resp_mask: np.ndarray):
    """Where `pack_sequences` puts each tree: (trees [(prompt b, its responses' indices)],
    row [T], offset [T], rows used). Each prompt's responses go first-fit decreasing into trees
    of at most W = P + N slots, with a copy of the prompt each; the trees go first-fit
    decreasing into rows of W."""
    (B, P), N = prompt_mask.shape, resp_mask.shape[-1]
    p, n = prompt_mask.sum(-1), resp_mask.sum(-1)
    if (p == 0).any():
        raise ValueError(f"pack_sequences: prompt {int(np.argmin(p))} has no tokens")
    trees = []
    for b in range(B):
        where, _, count = rows_needed(n[b], P + N - int(p[b]))
        trees += [(b, np.flatnonzero(where == t)) for t in range(count)]
    sizes = np.array([p[b] + n[b, ks].sum() for b, ks in trees])
    return (trees, *rows_needed(sizes, P + N))


def pack_sequences(prompt_mask: np.ndarray, resp_mask: np.ndarray, multiple: int = 1,
                   rows: int | None = None, head_width: int | None = None) -> SequencePacking:
    """Host-side packing of prompts (mask [B, P], left-padded) and their responses (mask
    [B, K', N], right-padded) into R = `rows` (default: the rows `tree_layout` needs, rounded up
    to `multiple`) rows of W = P + N slots, with Hc = `head_width` (default: the most any row
    needs, in steps of W / 32) predicting positions per row."""
    prompt_mask = np.asarray(prompt_mask).astype(bool)
    resp_mask = np.asarray(resp_mask).astype(bool)
    (B, P), (K, N) = prompt_mask.shape, resp_mask.shape[1:]
    W = L = P + N
    trees, row, offset, used = tree_layout(prompt_mask, resp_mask)
    R = rows if rows is not None else -(-used // multiple) * multiple
    if R < used:
        raise ValueError(f"pack_sequences: {len(trees)} trees need {used} rows of {W}, "
                         f"got rows={R}")
    take, positions, groups, parts = (np.zeros((R, W), np.int32) for _ in range(4))
    source = np.zeros((B, K, N + 1), np.int32)
    predicted = [[] for _ in range(R)]   # per row: (predicting slot, token's flat slot, b, k, i)
    for t, (b, ks) in enumerate(trees):
        r, c = row[t], offset[t]
        real = np.flatnonzero(prompt_mask[b])
        end = c + len(real)
        take[r, c:end] = (b * K + ks[0]) * L + real
        positions[r, c:end] = np.arange(len(real))
        groups[r, c:end] = t + 1
        last = r * W + end - 1
        for k in ks:
            slots = np.flatnonzero(resp_mask[b, k])
            stop = end + len(slots)
            take[r, end:stop] = (b * K + k) * L + P + slots
            positions[r, end:stop] = len(real) + np.arange(len(slots))
            groups[r, end:stop], parts[r, end:stop] = t + 1, k + 1
            source[b, k] = last
            source[b, k, 1 + slots] = r * W + np.arange(end, stop)
            before = np.r_[last - r * W, np.arange(end, stop - 1)]   # each token's predictor
            predicted[r] += [(int(c_), int(f), b, k, int(i)) for c_, f, i in
                             zip(before, take[r, end:stop], slots)]
            end = stop
    step = max(W // 32, 1)
    need = max(len(p_) for p_ in predicted)
    Hc = head_width if head_width is not None else max(-(-need // step) * step, step)
    if Hc < need:
        raise ValueError(f"pack_sequences: a row predicts {need} tokens, got head_width={Hc}")
    heads, head_tokens = np.zeros((R, Hc), np.int32), np.zeros((R, Hc), np.int32)
    head_of = np.zeros((B, K, N), np.int32)
    for r, row_heads in enumerate(predicted):
        for h, (c_, f, b, k, i) in enumerate(row_heads):
            heads[r, h], head_tokens[r, h] = c_, f
            head_of[b, k, i] = r * Hc + h
    return SequencePacking(take, positions, groups, parts, source, heads, head_tokens, head_of)


def pack_sequence_minibatches(prompt_mask: np.ndarray, resp_mask: np.ndarray,
                              index: np.ndarray, multiple: int = 1) -> SequencePacking:
    """`pack_sequences` of each minibatch (index [S, b]: its prompts), all in the same number
    of rows (the most any needs, rounded up to `multiple`): leaves [S, ...]."""
    prompt_mask, resp_mask = np.asarray(prompt_mask, bool), np.asarray(resp_mask, bool)
    used = max(tree_layout(prompt_mask[i], resp_mask[i])[3] for i in index)
    rows = -(-used // multiple) * multiple
    packs = [pack_sequences(prompt_mask[i], resp_mask[i], rows=rows) for i in index]
    width = max(pk.heads.shape[1] for pk in packs)
    return jax.tree.map(lambda *x: np.stack(x), *[widened(pk, width) for pk in packs])


def widened(pk: SequencePacking, width: int) -> SequencePacking:
    """`pk` with `width` >= Hc head positions per row (the new ones empty)."""
    Hc = pk.heads.shape[1]
    pad = lambda x: np.pad(x, ((0, 0), (0, width - Hc)))
    return pk.replace(heads=pad(pk.heads), head_tokens=pad(pk.head_tokens),
                      head_of=pk.head_of // Hc * width + pk.head_of % Hc)


def sequence_hidden(params, cfg: M.ModelConfig, tokens, packing: SequencePacking):
    """The trunk over [B, K', L] rows as `packing` lays them out: hiddens [B, K', N + 1, D] in
    `rollout.prompt_once_hidden`'s layout (index 0: the prompt's last token, i + 1: response
    token i; pads hold the prompt's last token's)."""
    hidden = packed_trunk(params, cfg, tokens, packing)
    return hidden.reshape(-1, hidden.shape[-1])[packing.source]


def packed_trunk(params, cfg: M.ModelConfig, tokens, packing: SequencePacking):
    """The trunk over the packed trees of [B, K', L] rows: hiddens [R, W, D]."""
    g, part = packing.groups, packing.parts
    sees = ((g[:, :, None] == g[:, None, :]) & (g[:, None, :] > 0)
            & ((part[:, None, :] == 0) | (part[:, None, :] == part[:, :, None])))  # [R, W, W]
    return M.forward(params, cfg, tokens.reshape(-1)[packing.take], sees,
                     positions=packing.positions)[0]


def packed_logits(params, cfg: M.ModelConfig, tokens, packing: SequencePacking):
    """The LM head on the packed trees' predicting positions only: (logits [R, Hc, V], the
    token each predicts [R, Hc]); response token i of (b, k) is at `packing.head_of[b, k, i]`
    of their [R * Hc] flattening."""
    hidden = packed_trunk(params, cfg, tokens, packing)
    hidden = jnp.take_along_axis(hidden, packing.heads[..., None], axis=1)      # [R, Hc, D]
    return M.lm_logits(params, cfg, hidden), tokens.reshape(-1)[packing.head_tokens]
