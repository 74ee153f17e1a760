"""TokenSkipPolicy: none | spts — Probe-and-Skip (2601.13155) for long prefills.

A block Y = X + F(X) (F = attention or MLP) is computed only for an *active* subset of a prefill
chunk's tokens; the others pass through bit-identically. The paper's internals are not public; the
choices made here, each a knob of :class:`sift.server.options.SkipOptions`:

* Where: prefill chunks of requests whose prompt has >= ``min_prompt_len`` tokens, in layers
  ``start_layer`` and deeper. Each chunk is treated on its own (with chunked prefill, the chunk's last
  ``probe_tokens`` tokens probe it); the last r tokens of a chunk, hence of the prompt, are always active,
  and so are its last ``recent`` tokens when that is more (a recent window: what the next tokens read
  most). Decode is never skipped.
* Attention subset — Partial Attention Probing: at the layer, the last r tokens' queries attend over the
  chunk's keys (causal); a token's importance is the probability mass it receives, averaged over query
  heads and probes. Active queries then attend exactly (causal, over the full context).
* MLP subset — Low-rank Transformation Probing: the MLP restricted to its r heaviest neurons (by a
  weight bound, picked the first time a layer is probed) gives f~(x) = D_S(silu(G_S x) * U_S x); a token's
  importance is ||f~(x)|| / ||h||, the predicted relative size of its update (the layer computes it:
  :meth:`sift.models.layers.GatedMLP.relative_update`, which says why not a truncated SVD).
* Multi-Stage Delayed Pruning: layers [start_layer, L) are split into ``stages`` equal stages (0, the
  default: one per layer); stage s skips ratio * (s + 1) / stages (``schedule="linear"``) or
  1 - (1 - ratio) ** ((s + 1) / stages) (``"geometric"``: every stage keeps the same share of the tokens the
  last one kept, so more is skipped early) of the chunk's tokens outside the always-active tail in each
  block. At the end of a stage its skip budget turns into pruning: the tokens skipped most often during
  the stage — in at least half of its block decisions (each layer's attention and/or MLP, whichever
  skip), most skips first, up to the stage's ratio of the chunk — are *pruned*: skipped (and no longer
  probed) in all later layers.
* Defaults, from forced perplexity on a 2,000-token pydoc context (dense 16.3): skipping attention only
  (``blocks="attention"``; the MLP still runs for every unpruned token) with a stage per layer, so a
  token the attention probe drops is pruned at once: 16.9 at ratio 0.5 from layer 8, 19.0 at 0.7,
  19.9 at 0.8 from layer 4. Skipped-but-unpruned tokens hurt: their stale hidden states still feed
  later layers' K/V (94.6 with 3 stages, both blocks, no pruning before the last stage; 53.0 with 3
  stages; 29.0 with a stage per layer). The MLP probe ranks update sizes well (close to the true update:
  26.8 vs 23.0 for MLP-only skipping) but a small update is no sign that later tokens can do without
  a token's K/V: pruning by it costs 91.2.
* Long prompts, from `sift.bench.long_context` at 8,000 tokens (dense perplexity 6.12 over 4 pydoc documents):
  the loss there comes from the latest tokens, which the next ones read most: with ``recent=512``, 0.95
  from layer 1 costs +1.8% instead of +2.9%, and 0.95 from layer 0 prefills 2.15x faster at +1.8%. The
  same settings cost +12% at 2,000 tokens, where the deepest layers keep 5% of the other 1,488 tokens,
  74 of them; ``min_prompt_len`` keeps such settings to long prompts. The geometric schedule skips more
  in early layers and loses more than a linear ramp of the same speed (0.8 from layer 2: 2.09x, +5.7%).
* KV of pruned tokens: a token pruned at the end of a stage is dropped from the KV that later layers
  *read* — in the rest of the prefill (active queries attend over the unpruned keys only; a chunk too
  short to probe still attends that way) and in decode (:class:`PrunedReads`: those layers read a slot
  list without the pruned tokens, through the sparse decode kernel). The paged pool keeps one KV length
  for all layers of a request, so the slots stay allocated (earlier layers read them); later layers
  compute no Q/K/V for them and leave their K/V unwritten. A request whose other options read the KV on
  their own terms (speculation, eviction, a sparse decode policy: ``techniques.reads_every_token``) keeps
  pruned tokens visible in decode, so their K/V is still written, from the pass-through hidden state.
  Per request, ``SkipState.prune_layer[i]`` is the first layer that no longer reads kv index i.
* A skipping request computes lossy KV: it neither reads nor feeds the prefix cache
  (:meth:`Skipping.exact_kv`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import torch

from sift.kernels import reference as ref
from sift.server.engine.request import Request
from sift.server.options import SkipOptions
from sift.server.policies.sparsity import PrunedReads
from sift.server.techniques import ALL_TOKENS, Technique, TechniqueState, reads_every_token

Tensor = torch.Tensor
QUERY_TILE = 512  # active queries per attention call in skipping layers (see _Segment.attention)
# cost of a masked (query, key) pair relative to one under the fused causal kernel (SDPA on CPU, measured
# 1.1-1.3x at 2K-8K keys); chooses between _Segment.attention's two ways
MASKED_COST = 1.25


# the skipping methods: whether each skips tokens at all
METHODS = {"none": False, "spts": True}
# the skip ratio of stage s + 1 of n, x = (s + 1) / n, on the way to the final ``ratio``
SCHEDULES = {"linear": lambda ratio, x: ratio * x, "geometric": lambda ratio, x: 1.0 - (1.0 - ratio) ** x}
# which blocks choose an active subset of tokens: (attention, MLP)
BLOCKS = {"attention": (True, False), "mlp": (False, True), "both": (True, True)}


def resolve_options(opts: Optional[SkipOptions], default: Optional[SkipOptions] = None) -> Optional[SkipOptions]:
    """The request's options, else the server default; None when skipping is off."""
    opts = opts if opts is not None else default
    return opts if opts is not None and METHODS[opts.method] else None


@dataclass
class SkipState(TechniqueState):
    """A skipping request's options and what its prefill pruned."""

    options: SkipOptions
    prune_layer: Optional[Tensor] = None  # [prefilled tokens] int16: the first layer that no longer reads each
    _reads: Optional[PrunedReads] = field(default=None, init=False, repr=False)
    reads_own_kv = False

    def restart(self, req) -> None:
        self.prune_layer = self._reads = None

    def applies(self, req: Request) -> bool:
        return req.num_prompt_tokens >= self.options.min_prompt_len

    def pruned_reads(self, req: Request, num_layers: int) -> Optional[PrunedReads]:
        """The decode reads of a request whose prefill pruned tokens, or None. Requests whose other techniques
        read the KV on their own terms (speculative trees, eviction scores, a sparse method) keep every token."""
        if self._reads is None:
            prune = self.prune_layer
            if prune is None or int(prune.min()) >= num_layers or reads_every_token(req):
                return None
            self._reads = PrunedReads(prune, num_layers)
        return self._reads


class Skipping(Technique):
    """Probe-and-Skip prefills: the request's options, else the server default. ``unsupported(blocks)`` is
    the model's reason it cannot skip those blocks (None: it can); such a request is refused at admission."""

    name = "skipping"

    def __init__(self, default: Optional[SkipOptions], unsupported: Callable[[str], Optional[str]]):
        self.default = default
        self.unsupported = unsupported

    def on_admit(self, req: Request) -> None:
        opts = resolve_options(req.params.skipping, self.default)
        if opts is not None:
            reason = self.unsupported(opts.blocks)
            if reason:
                raise ValueError(reason)
            req.technique_state[SkipState] = SkipState(opts)

    def exact_kv(self, req: Request) -> int:
        """A skipping prefill computes lossy KV: then no prefix cache either way."""
        state = req.state_of(SkipState)
        return 0 if state is not None and state.applies(req) else ALL_TOKENS


def layer_ratios(opts: SkipOptions, num_layers: int) -> list:
    """Per layer skip ratio: 0 below start_layer, then in stage s of ``stages`` (0: one stage per layer)
    ratio * (s + 1) / stages (``linear``), or 1 - (1 - ratio) ** ((s + 1) / stages) (``geometric``: every
    stage keeps the same share of the tokens the stage before kept)."""
    span = max(num_layers - opts.start_layer, 0)
    stages = opts.stages or max(span, 1)  # 0: a stage per layer
    out, ratio_at = [0.0] * num_layers, SCHEDULES[opts.schedule]
    for i in range(opts.start_layer, num_layers):
        out[i] = ratio_at(opts.ratio, (min((i - opts.start_layer) * stages // max(span, 1), stages - 1) + 1) / stages)
    return out


def stage_ends(opts: SkipOptions, num_layers: int) -> set:
    """Layers after which pruning happens (the last layer of every stage but the final one)."""
    ratios = layer_ratios(opts, num_layers)
    return {i for i in range(opts.start_layer, num_layers - 1) if ratios[i + 1] != ratios[i]}


def probe_attention(q_probe: Tensor, k: Tensor, scale: float, hidden: Optional[Tensor] = None) -> Tensor:
    """Partial Attention Probing. q_probe: [r, Hq, D] (the chunk's last r queries), k: [n, Hkv, D] (the chunk's
    keys), ``hidden`` ([n] bool) the keys the layer no longer reads. Returns each key's received attention
    [n], averaged over query heads and probes (causal).

    Each kv head's group of query heads is one matmul over its keys (no copy of K per query head), and the
    causal mask touches only the last r keys, the only ones a probe can precede: with hundreds of probes
    over thousands of keys this is the probe's whole cost."""
    r, hq, d = q_probe.shape
    n, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    q = q_probe.float().reshape(r, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * r, d)  # rows: (head, probe)
    logits = torch.matmul(q, k.float().permute(1, 2, 0)).mul_(scale)  # [Hkv, G * r, n]
    after = torch.ones(r, r, dtype=torch.bool, device=k.device).triu_(1)  # probe i, key n - r + j: j > i
    logits.view(hkv, g, r, n)[..., n - r:].masked_fill_(after, float("-inf"))
    if hidden is not None:
        logits.masked_fill_(hidden, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=(0, 1)).div_(hq * r)


class _Segment:
    """One skipping request's prefill chunk: rows [start, start + n) of the flat batch."""

    def __init__(self, b: int, start: int, n: int, kv_len: int, opts: SkipOptions, num_layers: int, meta,
                 req: Request):
        self.b, self.start, self.n, self.kv_len, self.opts = b, start, n, kv_len, opts
        self.ratios = layer_ratios(opts, num_layers)
        self.stage_ends = stage_ends(opts, num_layers)
        dev = meta.cu_seqlens_q.device
        self.rows = torch.arange(start, start + n, device=dev)
        self.r = min(opts.probe_tokens, n)
        self.kept = min(max(opts.recent, opts.probe_tokens), n)  # the chunk's last tokens, never skipped
        self.pruned = torch.zeros(n, dtype=torch.bool, device=dev)
        self.stage_skips = torch.zeros(n, dtype=torch.int32, device=dev)  # block decisions that skipped each token
        self.stage_decisions = 0
        self.slots = ref.slots_for(meta.block_tables[b], kv_len, meta.block_size)
        self.q_pos = torch.arange(kv_len - n, kv_len, device=dev)
        state = req.state_of(SkipState)
        if kv_len == n or state.prune_layer is None:  # a (re)started prefill: nothing pruned yet
            state.restart(req)
            state.prune_layer = torch.full((req.num_tokens,), num_layers, dtype=torch.int16, device=dev)
        self.prune_layer = state.prune_layer
        self.skips_attn, self.skips_mlp = BLOCKS[opts.blocks]  # which blocks choose an active subset
        self.drops_kv = not reads_every_token(req)  # pruned tokens' later-layer K/V are never read: skip them

    def num_skipped(self, layer: int) -> int:
        return max(int(self.ratios[layer] * (self.n - self.kept)), int(self.pruned.sum()))

    def choose(self, layer: int, importance: Optional[Tensor], skip_block: bool) -> Tensor:
        """Local indices [m] (sorted) of the active tokens of one block; None importance = all active."""
        k = self.num_skipped(layer) if skip_block else 0
        if importance is None or k == 0:
            return torch.nonzero(~self.pruned).flatten()
        score = importance.masked_fill(self.pruned, float("-inf"))
        score[self.n - self.kept:] = float("inf")  # the probes and the recent window are always active
        keep = torch.topk(score, self.n - k).indices
        return keep.sort().values

    def end_layer(self, layer: int, attn_active: Tensor, mlp_active: Tensor) -> None:
        """Delayed pruning (see the module doc): count this layer's skips; at a stage end, prune."""
        for counts, active in ((self.skips_attn, attn_active), (self.skips_mlp, mlp_active)):
            if counts:  # a decision of a block that skips tokens: every token skipped but the active ones
                self.stage_skips += 1
                self.stage_skips[active] -= 1
                self.stage_decisions += 1
        if layer in self.stage_ends:
            cap = int(self.ratios[layer] * (self.n - self.kept)) - int(self.pruned.sum())
            score = self.stage_skips.masked_fill(self.pruned | (2 * self.stage_skips < self.stage_decisions), -1)
            top = torch.topk(score, max(min(cap, self.n), 0))
            newly = top.indices[top.values >= 0]
            self.pruned[newly] = True
            self.prune_layer[self.kv_len - self.n + newly] = layer + 1
            self.stage_skips.zero_()
            self.stage_decisions = 0

    def attention(self, layer: int, q: Tensor, k_cache: Tensor, v_cache: Tensor, local: Tensor,
                  scale: float) -> Tensor:
        """Causal attention of the active queries ``local`` over the request's KV that ``layer`` still reads
        (every kv index not pruned before it), gathered once. Two ways, whichever the cost model prefers:

        * *placed*: every kept key gets a query row (the active queries at their own key index — an active
          token is never pruned — zeros elsewhere) and one fused causal call covers the kept-key triangle;
          no mask, so it wins while most kept tokens are active;
        * *tiled*: the active queries in position-ordered tiles, each over the keys up to its last query
          under a mask, so the work follows the active queries' causal triangle; it wins once few are.
        """
        keys = torch.nonzero(self.prune_layer[:self.kv_len] > layer).flatten()
        m, nk = len(local), keys.numel()
        if m == self.kv_len and nk == self.kv_len:  # a fresh prompt, all of it: plain causal
            return ref.causal_sdpa(q, k_cache[self.slots], v_cache[self.slots], scale)
        q_pos = self.q_pos[local]
        kslots = self.slots[keys]
        k_kept, v_kept = k_cache[kslots], v_cache[kslots]
        last = [min((t + 1) * QUERY_TILE, m) - 1 for t in range(-(-m // QUERY_TILE))]
        ends = torch.searchsorted(keys, q_pos[last], right=True).tolist()
        tiled = sum((min(m, (t + 1) * QUERY_TILE) - t * QUERY_TILE) * end for t, end in enumerate(ends))
        if MASKED_COST * tiled > nk * nk / 2:
            at = torch.searchsorted(keys, q_pos)
            placed = q.new_zeros((nk,) + q.shape[1:])
            placed[at] = q
            return ref.causal_sdpa(placed, k_kept, v_kept, scale)[at]
        out = torch.empty_like(q)
        for t, end in enumerate(ends):
            rows = slice(t * QUERY_TILE, (t + 1) * QUERY_TILE)
            out[rows] = ref.causal_sdpa(q[rows], k_kept[:end], v_kept[:end], scale,
                                        keys[:end][None, :] <= q_pos[rows, None])
        return out


class SkipPlanner:
    """Runner-level: turns each step into a :class:`SkipPlan` (or None)."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        # prompt tokens prefilled with skipping, and (token, block) computations skipped (attention + MLP)
        self.counters = {"skip_prefill_tokens": 0, "skip_token_blocks": 0}

    def plan(self, sched, requests: dict, meta) -> Optional["SkipPlan"]:
        segments, offset = [], 0
        for b, s in enumerate(sched.requests):
            req = requests[s.request_id]
            state = req.state_of(SkipState)
            n = len(s.token_ids)
            # a chunk too short to probe still runs here once the prompt pruned tokens: it must not read them
            if (state is not None and state.applies(req) and s.window == 0 and s.draft_parents is None
                    and (n > state.options.probe_tokens or (s.kv_len > n and state.prune_layer is not None))
                    and s.positions[0] < req.num_prompt_tokens and state.options.start_layer < self.num_layers):
                segments.append(_Segment(b, offset, n, s.kv_len, state.options, self.num_layers, meta, req))
            offset += n
        if not segments:
            return None
        self.counters["skip_prefill_tokens"] += sum(s.n for s in segments)
        return SkipPlan(segments, offset, meta, self.counters)


class SkipPlan:
    """One step's token skipping for its segments (see the module doc), as the decoder layers' row subsets
    (:class:`sift.models.batch.RowSubsets`): it picks rows; the layers do the math."""

    def __init__(self, segments: list, num_rows: int, meta, counters: dict):
        self.segments = segments
        self.num_rows = num_rows
        self.meta = meta
        self.counters = counters
        self.first_layer = min(s.opts.start_layer for s in segments)
        dev = segments[0].rows.device
        in_seg = torch.zeros(num_rows, dtype=torch.bool, device=dev)
        for s in segments:
            in_seg[s.rows] = True
        self.other_rows = torch.nonzero(~in_seg).flatten()
        self._active: list = []  # this layer's segments past their start layer
        self._attn_local: dict = {}  # this layer's attention choice per segment (read again by mlp_rows)

    def runs(self, layer: int) -> bool:
        return layer >= self.first_layer

    def kv_rows(self, layer: int) -> Optional[Tensor]:
        """Pruned tokens get no Q/K/V from here on (their q and k rows stay zero; nothing reads them)."""
        dropped = [s.rows[s.pruned] for s in self.segments if s.drops_kv and s.pruned.any()]
        if not dropped:
            return None
        live = torch.ones(self.num_rows, dtype=torch.bool, device=self.other_rows.device)
        live[torch.cat(dropped)] = False
        return torch.nonzero(live).flatten()

    def attend(self, layer: int, q: Tensor, k: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float,
               dense) -> tuple[Tensor, Tensor]:
        meta = self.meta
        active = self._active = [s for s in self.segments if layer >= s.opts.start_layer]
        # the backend serves the other rows; it also runs when a sparse plan or score emission must see
        # every layer (their cost on the segment rows is then wasted, never wrong)
        if self.other_rows.numel() or len(active) < len(self.segments) or meta.sparse is not None \
                or layer in meta.score_layers:
            out = dense()
        else:
            out = torch.empty_like(q)
        rows, self._attn_local = [self.other_rows], {}
        for s in active:
            imp = (probe_attention(q[s.rows[-s.r:]], k[s.rows], scale, s.pruned)
                   if s.skips_attn and s.ratios[layer] else None)
            local = self._attn_local[s] = s.choose(layer, imp, s.skips_attn)
            out[s.rows[local]] = s.attention(layer, q[s.rows[local]], k_cache, v_cache, local, scale)
            rows.append(s.rows[local])
        rows += [s.rows for s in self.segments if s not in active]
        return out, torch.cat(rows)

    def mlp_rows(self, layer: int, h: Tensor, probe) -> Tensor:
        active, attn_local = self._active, self._attn_local
        rows = [self.other_rows] + [s.rows for s in self.segments if s not in active]
        for s in active:
            # skipping attention only, the layer's pruning is known before its MLP; a token pruned here gets
            # no MLP either when nothing reads its hidden state again (no later K/V of it is computed)
            early = not s.skips_mlp and s.drops_kv
            if early:
                s.end_layer(layer, attn_local[s], attn_local[s])
            imp = None
            if s.skips_mlp and s.ratios[layer]:  # probe the tokens still in play (pruned ones stay skipped)
                live = torch.nonzero(~s.pruned).flatten()
                imp = torch.full((s.n,), float("-inf"), device=h.device)
                imp[live] = probe(s.rows[live], s.opts.probe_rank)
            local = s.choose(layer, imp, s.skips_mlp)
            if not early:
                s.end_layer(layer, attn_local[s], local)
            self.counters["skip_token_blocks"] += 2 * s.n - len(local) - len(attn_local[s])
            rows.append(s.rows[local])
        return torch.cat(rows)
